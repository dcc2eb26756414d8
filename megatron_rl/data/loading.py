"""Read local parquet / jsonl files into a ``datasets.Dataset`` (no hub access)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from megatron_rl.data.errors import DataError

_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def load_table(path: str | Sequence[str], cache_dir: str | None = None):
    """The rows of one or more local files of the same format, in file order, as a ``datasets.Dataset``."""
    import datasets

    files = [str(path)] if isinstance(path, (str, Path)) else [str(p) for p in path]
    if not files:
        raise DataError("data.path is empty: give a .parquet, .jsonl or .json file")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DataError(f"data file not found: {', '.join(missing)} (data.path must name local files)")
    builders = {_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        raise DataError(f"data.path files must all be .parquet or all .jsonl/.json, got {files}")
    builder = builders.pop()
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    except Exception as error:  # datasets wraps parse errors in several types
        cause = error.__cause__ or error
        raise DataError(f"cannot read {files} as {builder}: {type(cause).__name__}: {cause}") from error
