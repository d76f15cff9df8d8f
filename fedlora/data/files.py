"""Reading a user's data: a file (CSV, JSONL, parquet) or a Hugging Face dataset.

A Hugging Face dataset is a folder in the Hub's layout (``data/train-*.parquet``, or a
``save_to_disk`` folder) or a hub id ``user/name`` (online only),
read with ``datasets``; every split is read (fedlora makes its own train/test split from
the run's seed) and ``ClassLabel`` columns become their label names (rows labelled -1,
unlabelled, are left out). Errors name the dataset.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from fedlora.config import ConfigError
from fedlora.config.values import offline_hint

FILE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_dataset(value: str) -> bool:
    """A dataset folder in the Hub's layout, or something that reads as a hub id."""
    path = Path(value).expanduser()
    if path.is_dir():
        return True
    return (
        not path.exists()
        and path.suffix.lower() not in FILE_SUFFIXES
        and "/" in value
        and bool(_HUB_ID.fullmatch(value))
    )


def read_hub_dataset(value: str) -> pd.DataFrame:
    """Every split of a Hugging Face dataset as one frame, class labels as their names."""
    import datasets

    path = Path(value).expanduser()
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path) if path.is_dir() else value)
    except Exception as err:  # datasets raises many types; all mean "cannot be read"
        hint = offline_hint(
            value, "save it once with datasets' save_to_disk, or download it, and pass the folder"
        )
        raise ConfigError(
            f"Invalid value for 'dataset': {value!r} cannot be loaded ({err}){hint}"
        ) from None
    splits = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    frames = []
    for split in splits:
        frame = split.to_pandas()
        for column, feature in split.features.items():
            if isinstance(feature, datasets.ClassLabel):
                frame = frame[frame[column] >= 0]  # -1: unlabelled (test splits, 'unsupervised')
                frame[column] = [feature.int2str(int(v)) for v in frame[column]]
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    if frame.empty:
        raise ConfigError(f"Invalid value for 'dataset': {value!r} has no rows")
    return frame


def read_frame(path: Path) -> pd.DataFrame:
    """The rows of ``path``; an unknown extension or an unreadable file is a ConfigError."""
    if is_hub_dataset(str(path)):
        return read_hub_dataset(str(path))
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise ConfigError(
                f"Invalid value for 'dataset': {str(path)!r} has unsupported extension "
                f"{suffix!r} (use .csv, .jsonl or .parquet)"
            )
    except (OSError, ValueError, pd.errors.ParserError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            f"Invalid value for 'dataset': {str(path)!r} cannot be read ({err})"
        ) from None
    if frame.empty:
        raise ConfigError(f"Invalid value for 'dataset': {str(path)!r} has no rows")
    return frame


def file_stamp(path: str | None) -> str:
    """Absolute path, size and newest modification time of a local file or folder.

    An edited data file or a changed local tokenizer makes a new key. A name that is not
    on disk (a built-in dataset, a hub id) is returned as it is.
    """
    if not path:
        return ""
    target = Path(path).expanduser()
    if not target.exists():
        return str(path)
    try:
        files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
        stats = [f.stat() for f in files]
    except OSError:
        return f"{target.resolve()}:unreadable"
    size = sum(st.st_size for st in stats)
    newest = max((st.st_mtime_ns for st in stats), default=0)
    return f"{target.resolve()}:{size}:{newest}"
