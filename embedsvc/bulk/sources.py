"""Where `embedsvc embed` reads rows from: files (JSONL, Parquet, CSV, Arrow), a dataset
saved with `datasets.save_to_disk`, or a Hugging Face dataset read with `datasets` (a Hub id
at a pinned revision, or a local dataset folder).

Every source yields Arrow record batches in one fixed order, in bounded memory (pyarrow's
streaming readers; memory-mapped Arrow for `datasets`), and has a fingerprint that changes
when its content does, so a resumed job can tell it is reading the same input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedsvc.errors import ConfigError

READ_ROWS = 4096  # rows per record batch read
FILE_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
}
FORMATS = ("auto", "jsonl", "parquet", "csv", "arrow", "hf", "openai-batch")


@dataclass
class Source:
    """Rows to embed, in a fixed order."""

    kind: str  # files | saved | hf
    description: dict[str, Any]
    fingerprint: str
    _open: Any = field(repr=False, default=None)

    def batches(self, columns: list[str]) -> Iterator[dict[str, list[Any]]]:
        """Blocks of rows as {column: values} for the `columns` that exist, in order."""
        for block in self._open(columns):
            if isinstance(block, dict):
                yield block
            else:  # a pyarrow RecordBatch or Table
                yield {name: block.column(name).to_pylist() for name in block.schema.names}


def open_source(
    path: str, fmt: str, *, split: str | None, revision: str | None, streaming: bool
) -> Source:
    if fmt not in FORMATS or fmt == "openai-batch":
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    p = Path(path)
    if fmt == "hf" or (fmt == "auto" and not p.exists()):
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return _saved(p, split)
        return _hf(path, split=split, revision=revision, streaming=streaming)
    if not p.exists():
        raise ConfigError(f"input {path} does not exist")
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        return _saved(p, split)
    return _files(p, fmt)


# ---- files ---------------------------------------------------------------------------------


def _files(p: Path, fmt: str) -> Source:
    import pyarrow.dataset as ds

    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    if fmt == "auto":
        kinds = {FILE_FORMATS.get(f.suffix.lower()) for f in files} - {None}
        if len(kinds) != 1:
            found = ", ".join(sorted(k for k in kinds if k)) or "none"
            raise ConfigError(
                f"cannot tell the format of {p} (formats found: {found}); give --format "
                "jsonl|parquet|csv|arrow"
            )
        fmt = kinds.pop() or ""
    arrow_fmt = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(
        fmt, "ipc"
    )
    if p.is_dir():
        kind = {"ipc": "arrow"}.get(arrow_fmt, arrow_fmt)
        files = [f for f in files if FILE_FORMATS.get(f.suffix.lower()) == kind]
    if not files:
        raise ConfigError(f"no {fmt} files in {p}")
    fingerprint = digest(p, files)

    def read(columns: list[str]) -> Iterator[Any]:
        for f in files:  # one file at a time, in name order: a fixed row order
            if arrow_fmt == "json":  # line by line: one bad line is one bad row
                yield from _json_lines(f, columns)
                continue
            dataset = ds.dataset(str(f), format=arrow_fmt)
            cols = [c for c in columns if c in dataset.schema.names]
            yield from dataset.to_batches(columns=cols, batch_size=READ_ROWS)

    description: dict[str, Any] = {"path": str(p.resolve()), "format": fmt, "files": len(files)}
    # Rows for the progress bar's ETA: from metadata, or by counting lines (a fast pass).
    if arrow_fmt in ("parquet", "ipc"):
        description["rows"] = sum(ds.dataset(str(f), format=arrow_fmt).count_rows() for f in files)
    elif arrow_fmt == "json":
        description["rows"] = sum(_count_lines(f) for f in files)
    return Source("files", description, fingerprint, read)


# ---- datasets ------------------------------------------------------------------------------


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "reading Hugging Face datasets needs the datasets library: pip install 'embedsvc[bulk]'"
        ) from None
    return datasets


def _pick_split(d: Any, split: str | None, where: str) -> Any:
    if hasattr(d, "keys"):  # a DatasetDict
        names = list(d.keys())
        if split is None:
            if len(names) != 1:
                raise ConfigError(f"{where} has splits {', '.join(names)}; choose one with --split")
            split = names[0]
        if split not in names:
            raise ConfigError(f"{where} has no split {split!r} (it has {', '.join(names)})")
        return d[split], split
    return d, split


def _table_batches(d: Any, columns: list[str]) -> Iterator[Any]:
    cols = [c for c in columns if c in (d.column_names or [])]
    for table in d.select_columns(cols).with_format("arrow").iter(batch_size=READ_ROWS):
        yield from table.to_batches()


def _saved(p: Path, split: str | None) -> Source:
    d, split = _pick_split(_datasets().load_from_disk(str(p)), split, str(p))
    description = {"path": str(p.resolve()), "format": "saved", "split": split, "rows": len(d)}
    return Source("saved", description, str(d._fingerprint), lambda cols: _table_batches(d, cols))


def _hf(name: str, *, split: str | None, revision: str | None, streaming: bool) -> Source:
    local = Path(name).exists()
    if not local and not revision:
        raise ConfigError(
            f"{name} is read from the Hugging Face Hub: pin it with --revision (a commit SHA) "
            "so a rerun reads the same rows"
        )
    datasets = _datasets()
    try:
        d = datasets.load_dataset(name, revision=revision, split=split, streaming=streaming)
    except ValueError as e:  # an unknown split, among others
        raise ConfigError(f"cannot read dataset {name}: {e}") from e
    d, split = _pick_split(d, split, name)
    description = {"dataset": name, "revision": revision, "split": split, "format": "hf"}
    if local:
        root = Path(name)
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        fingerprint = f"{digest(root, files)}:{split}"
    else:
        fingerprint = f"{name}@{revision}:{split}"
    if streaming:

        def read(columns: list[str]) -> Iterator[Any]:
            import pyarrow as pa

            cols = [c for c in columns if c in (d.column_names or columns)]
            for batch in d.select_columns(cols).iter(batch_size=READ_ROWS):
                yield pa.RecordBatch.from_pydict(batch)

        return Source("hf", description, fingerprint, read)
    description["rows"] = len(d)
    return Source("hf", description, fingerprint, lambda cols: _table_batches(d, cols))


def _count_lines(path: Path) -> int:
    """Non-blank lines of a text file."""
    n = 0
    with open(path, "rb") as f:
        for line in f:
            n += bool(line.strip())
    return n


class BadRow(str):
    """A row that could not be read at all (not JSON, not an object): the reason."""


def _json_lines(path: Path, columns: list[str]) -> Iterator[dict[str, list[Any]]]:
    """Blocks of rows from a JSONL file; values of any type are kept as they are (a number
    where text belongs is that row's error, not the file's)."""
    import orjson

    block: dict[str, list[Any]] = {c: [] for c in columns}
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                row = {columns[0]: BadRow(f"{path.name} line {n} is not a JSON object: {e}")}
            for c in columns:
                block[c].append(row.get(c, MISSING))
            if len(block[columns[0]]) >= READ_ROWS:
                yield block
                block = {c: [] for c in columns}
    if block[columns[0]]:
        yield block


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # a row without the column


def digest(root: Path, files: list[Path]) -> str:
    """Names and the whole content of each file: an edit anywhere changes it, a copy of
    the same files to another place does not. Hashing reads the corpus once more (about
    a second per GB), which a job that then embeds it does not notice."""
    h = hashlib.sha256()
    for f in files:
        name = f.relative_to(root) if root.is_dir() else f.name
        h.update(json.dumps([str(name), f.stat().st_size]).encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()
