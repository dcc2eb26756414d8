"""The package's layering (docs/design.md, "Packages and their layers"): every import of a megatron_rl module,
at module level or inside a function, must target a package of the same or a lower layer, and the packages' imports
must form no cycle. Parsed from the source (nothing is imported), so it runs in milliseconds."""
import ast
import collections
import pathlib

import pytest

import megatron_rl

# Lowest first. A "package" is the first name under megatron_rl (a sub-package or a top-level module).
LAYERS: list[set[str]] = [
    {"__init__", "_warnings", "errors", "faults", "config_loader", "process_exit"},
    {"algorithms", "tasks", "cluster"},
    {"parallel"},
    {"models"},
    {"checkpoint"},
    {"actor", "rollout", "rewards", "data"},
    {"config"},
    {"training"},
    {"benchmarks", "commands", "cli"},
]
LAYER_OF = {package: index for index, packages in enumerate(LAYERS) for package in packages}
ROOT = pathlib.Path(megatron_rl.__file__).parent


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: pathlib.Path) -> str:
    relative = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported megatron_rl module) for every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("megatron_rl")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("megatron_rl"):
                # `from megatron_rl import x` imports the sub-package x when x is one
                if name == "megatron_rl":
                    found += [(node.lineno, f"megatron_rl.{alias.name}") for alias in node.names
                              if (ROOT / alias.name).exists() or (ROOT / f"{alias.name}.py").exists()]
                    found += [(node.lineno, name) for alias in node.names
                              if not ((ROOT / alias.name).exists() or (ROOT / f"{alias.name}.py").exists())]
                else:
                    found.append((node.lineno, name))
    return found


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {_package_of(_module_name(p)) for p in SOURCES}
    missing = sorted(packages - set(LAYER_OF))
    assert not missing, f"packages without a declared layer (add them to LAYERS and docs/design.md): {missing}"


def test_no_import_goes_up_a_layer():
    upward = []
    for path in SOURCES:
        source_package = _package_of(_module_name(path))
        for line, target in _imports(path):
            target_package = _package_of(target)
            if LAYER_OF[target_package] > LAYER_OF[source_package]:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line}: {source_package} (layer "
                              f"{LAYER_OF[source_package]}) imports {target} (layer {LAYER_OF[target_package]})")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_packages_import_each_other_without_cycles():
    edges = collections.defaultdict(set)
    for path in SOURCES:
        source_package = _package_of(_module_name(path))
        for _, target in _imports(path):
            if _package_of(target) != source_package:
                edges[source_package].add(_package_of(target))

    def cycle_from(start, node, seen):
        for nxt in sorted(edges[node]):
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                rest = cycle_from(start, nxt, seen)
                if rest:
                    return [node, *rest]
        return None

    for package in sorted(edges):
        cycle = cycle_from(package, package, {package})
        assert cycle is None, f"package import cycle: {' -> '.join(cycle)}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk is not vacuous: a made-up module of a low layer importing a high one is reported."""
    fake = ROOT / "algorithms" / "_layer_probe_for_test.py"
    fake.write_text("def f():\n    from megatron_rl.training.trainer import Trainer\n", encoding="utf-8")
    try:
        found = _imports(fake)
    finally:
        fake.unlink()
    assert found == [(2, "megatron_rl.training.trainer")]
    assert LAYER_OF[_package_of(found[0][1])] > LAYER_OF["algorithms"]


@pytest.mark.parametrize("package", sorted({"algorithms"}))
def test_algorithms_import_no_framework(package):
    """megatron_rl.algorithms is pure torch: no megatron, ray or vllm anywhere in it."""
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ("megatron", "ray", "vllm", "transformer_engine")]
    assert not offenders, offenders
