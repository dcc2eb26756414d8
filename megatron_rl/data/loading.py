"""Read local parquet / jsonl files into a ``datasets.Dataset`` (no hub access)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from megatron_rl.data.errors import DataError

_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def data_files_problem(path: str | Sequence[str]) -> str | None:
    """What is wrong with `path` as a list of local data files (None: nothing). File-system checks only, so the
    config check runs it in milliseconds before anything starts."""
    files = [str(path)] if isinstance(path, (str, Path)) else [str(p) for p in path]
    if not files:
        return "is empty: give a .parquet, .jsonl or .json file"
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        return f"file not found: {', '.join(missing)} (local files only: there is no hub download)"
    builders = {_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        return f"files must all be .parquet or all .jsonl/.json, got {files}"
    return None


def load_table(path: str | Sequence[str], cache_dir: str | None = None, *, key: str = "data"):
    """The rows of one or more local files of the same format, in file order, as a ``datasets.Dataset``.
    key: the config key of the data section, which error messages name."""
    import datasets

    problem = data_files_problem(path)
    if problem:
        raise DataError(f"{key}.path: {problem}")
    files = [str(path)] if isinstance(path, (str, Path)) else [str(p) for p in path]
    builder = _BUILDERS[Path(files[0]).suffix.lower()]
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    except Exception as error:  # datasets wraps parse errors in several types
        cause = error.__cause__ or error
        raise DataError(f"cannot read {files} as {builder}: {type(cause).__name__}: {cause}") from error
