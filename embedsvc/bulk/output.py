"""The output folder of `embedsvc embed`: Parquet shards, `_manifest.json`, `_errors.jsonl`.

A shard is written to a temporary name and renamed into place once complete and synced;
only then does the manifest (itself replaced atomically) list it, with its row range and
checksum. A job killed at any moment therefore leaves finished shards that the manifest
names and at most one unlisted partial file, which the next run overwrites. The manifest
also records how long `_errors.jsonl` was at each commit, so error rows of a shard that
never finished are cut off on resume: every input row ends up exactly once in the output
or in the errors.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedsvc.errors import ConfigError

MANIFEST = "_manifest.json"
# A leading underscore, like _manifest.json: pyarrow, pandas, datasets, polars and Spark skip
# such files when they read the folder, so DIR reads as a Parquet dataset as it is.
ERRORS = "_errors.jsonl"
FORMAT_VERSION = 1
ROW_GROUP_ROWS = 8192


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Manifest:
    """What the job is (compared on resume) and what it has finished."""

    job: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)
    errors_bytes: int = 0
    complete: bool = False
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {
            "format_version": FORMAT_VERSION,
            "job": self.job,
            "shards": self.shards,
            "errors_bytes": self.errors_bytes,
            "complete": self.complete,
            "summary": self.summary,
        }
        return json.dumps(body, indent=1).encode()

    def done(self) -> set[int]:
        return {int(s["index"]) for s in self.shards}


def open_output(
    out: Path, job: dict[str, Any], overwrite: bool, errors_name: str = ERRORS
) -> Manifest:
    """The manifest to continue (same job), or a fresh one in an emptied folder."""
    path = out / MANIFEST
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_bytes())
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); use --overwrite") from e
        was = old.get("job", {})
        differ = [k for k in sorted(set(job) | set(was)) if was.get(k) != job.get(k)]
        if differ:
            detail = "; ".join(f"{k}: was {was.get(k)!r}, now {job.get(k)!r}" for k in differ)
            raise ConfigError(
                f"{out} holds the output of another job ({detail}); use another --output, "
                "or --overwrite to start over"
            )
        m = Manifest(job, old.get("shards", []), int(old.get("errors_bytes", 0)))
        m.complete = bool(old.get("complete"))
        m.summary = old.get("summary", {})
        errors = out / errors_name
        if errors.exists() and errors.stat().st_size > m.errors_bytes:
            with open(errors, "r+b") as fh:  # error rows of a shard that did not finish
                fh.truncate(m.errors_bytes)
        return m
    if out.exists() and any(out.iterdir()) and not path.is_file() and not overwrite:
        raise ConfigError(f"{out} exists and is not an embedsvc output folder; choose another")
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file() and (f.suffix in (".parquet", ".tmp", ".jsonl") or f.name == MANIFEST):
            f.unlink()
    m = Manifest(job)
    write_atomic(path, m.to_json())
    return m


class ShardWriter:
    """One Parquet shard: columns id, embedding (fixed-size list), n_tokens."""

    def __init__(self, out: Path, index: int, first_row: int, dim: int, dtype: str) -> None:
        self.out = out
        self.index = index
        self.first_row = first_row
        self.name = f"part-{index:05d}.parquet"
        self.tmp = out / (self.name + ".tmp")
        self.dim = dim
        self.dtype = dtype
        self.rows = 0
        self.failed = 0
        self.tokens = 0
        self._writer: Any = None
        self._pending: list[tuple[list[Any], np.ndarray, list[int]]] = []
        self._pending_rows = 0

    def add(self, ids: list[Any], vectors: np.ndarray, n_tokens: list[int]) -> None:
        self._pending.append((ids, vectors, n_tokens))
        self._pending_rows += len(ids)
        self.rows += len(ids)
        self.tokens += sum(n_tokens)
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._write()

    def _write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        ids = [i for chunk in self._pending for i in chunk[0]]
        vectors = np.concatenate([chunk[1] for chunk in self._pending]).astype(self.dtype)
        n_tokens = [n for chunk in self._pending for n in chunk[2]]
        self._pending, self._pending_rows = [], 0
        flat = pa.array(vectors.reshape(-1), type=pa.from_numpy_dtype(vectors.dtype))
        id_type = pa.int64() if all(isinstance(i, int) for i in ids) else pa.string()
        table = pa.table(
            {
                "id": pa.array(ids if id_type == pa.int64() else [str(i) for i in ids], id_type),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, self.dim),
                "n_tokens": pa.array(n_tokens, pa.int32()),
            }
        )
        if self._writer is None:
            self._writer = pq.ParquetWriter(str(self.tmp), table.schema)
        elif table.schema != self._writer.schema:
            table = table.cast(self._writer.schema)
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)

    def close(self, n_input_rows: int) -> dict[str, Any]:
        """Finish the file (none when every row failed) and say what the shard holds."""
        self._write()
        record: dict[str, Any] = {
            "index": self.index,
            "first_row": self.first_row,
            "input_rows": n_input_rows,
            "rows": self.rows,
            "failed": self.failed,
            "tokens": self.tokens,
            "file": None,
        }
        if self._writer is not None:
            self._writer.close()
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
            final = self.out / self.name
            os.replace(self.tmp, final)
            record.update(file=self.name, sha256=sha256_file(final), bytes=final.stat().st_size)
        return record


class OutputWriter:
    """Chunks, in input order, into shards and errors.jsonl; a shard is committed (file
    renamed into place, errors synced, manifest updated) when the next one starts or the
    job finishes. Called from one thread at a time."""

    def __init__(self, out: Path, manifest: Manifest, shard_rows: int, dim: int, dtype: str):
        self.out = out
        self.manifest = manifest
        self.shard_rows = shard_rows
        self.dim = dim
        self.dtype = dtype
        self.errors = open(out / ERRORS, "ab")  # noqa: SIM115 (closed by close())
        self._shard: ShardWriter | None = None
        self._input_rows = 0

    def add(self, chunk: Any) -> None:
        if self._shard is not None and self._shard.index != chunk.shard:
            self.finish()
        if self._shard is None:
            first = chunk.shard * self.shard_rows
            self._shard = ShardWriter(self.out, chunk.shard, first, self.dim, self.dtype)
        if chunk.ids:
            self._shard.add(chunk.ids, chunk.vectors, chunk.tokens)
        self._shard.failed += len(chunk.errors)
        self._input_rows += chunk.input_rows
        for line in chunk.errors:
            self.errors.write(line)

    def finish(self) -> None:
        """Commit the shard in progress, if any."""
        if self._shard is None:
            return
        record = self._shard.close(self._input_rows)
        self.errors.flush()
        os.fsync(self.errors.fileno())
        self.manifest.shards.append(record)
        self.manifest.errors_bytes = self.errors.tell()
        write_atomic(self.out / MANIFEST, self.manifest.to_json())
        self._shard, self._input_rows = None, 0

    def close(self) -> None:
        self.errors.close()
