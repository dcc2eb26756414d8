"""Every relative link in README.md and docs/ points at a file (or folder) of the repository, and every #anchor at a
heading of the page it names (GitHub's slugs). External links (http, mailto) are not followed."""
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(page: pathlib.Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]


def test_docs_exist_and_readme_is_short():
    assert len(PAGES) > 10
    assert (REPO / "README.md").stat().st_size < 15_000, "README.md is the front door: keep topics in docs/"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file {resolved.relative_to(REPO) if REPO in resolved.parents else resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_every_docs_page_is_reachable_from_the_readme():
    reachable, todo = set(), [REPO / "README.md"]
    while todo:
        page = todo.pop()
        for target in _links(page):
            path = target.partition("#")[0]
            if path.endswith(".md"):
                resolved = (page.parent / path).resolve()
                if resolved.exists() and resolved not in reachable:
                    reachable.add(resolved)
                    todo.append(resolved)
    missing = [str(p.relative_to(REPO)) for p in PAGES[1:] if p.resolve() not in reachable]
    assert not missing, f"docs pages no link leads to: {missing}"


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [bad](nowhere.md) [anchor](#missing)\n```\n[ignored](x.md)\n```\n")
    assert _links(page) == ["#title", "nowhere.md", "#missing"]
    assert _anchors(page) == {"title"}


def test_contract_citations_point_at_a_contract_of_docs_design():
    """Code cites the contracts as "docs/design.md, contract N"; each N must be a contract of that page, and no code
    cites a design file outside the repository."""
    contracts = {int(n) for n in re.findall(r"^### Contract (\d+):", (REPO / "docs" / "design.md").read_text(), re.M)}
    assert contracts == {1, 2, 3, 4, 5}
    cited, outside = set(), []
    for path in [*REPO.glob("megatron_rl/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("tools/*.py")]:
        text = path.read_text(encoding="utf-8")
        cited |= {int(n) for n in re.findall(r"design\.md, contracts? (\d+)", text)}
        if re.search(r"\b" + "DESIGN" + r"\.md", text) and path.name != "test_docs_links.py":
            outside.append(str(path.relative_to(REPO)))
    assert cited and cited <= contracts, f"cited contracts {sorted(cited)} not all in docs/design.md {sorted(contracts)}"
    assert not outside, f"cite docs/design.md, not a DESIGN.md outside the repository: {outside}"
