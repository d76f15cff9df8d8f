"""Reading a user's data file (CSV, JSONL, parquet) with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedlora.config import ConfigError


def read_frame(path: Path) -> pd.DataFrame:
    """The rows of ``path``; an unknown extension or an unreadable file is a ConfigError."""
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
