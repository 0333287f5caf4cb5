"""The output folder of `embedsvc embed`: Parquet shards, `_manifest.json`, `_errors.jsonl`.

A shard is a range of consecutive input rows, written to a temporary name and renamed
into place once complete and synced; only then does the manifest (itself replaced
atomically) list it, with its row range and checksum. A resumed job starts at the first row
no listed shard holds. A job killed at any moment therefore leaves finished shards that the manifest
names and at most one unlisted partial file, which the next run overwrites. The manifest
also records how long `_errors.jsonl` was at each commit, so error rows of a shard that
never finished are cut off on resume: every input row ends up exactly once in the output
or in the errors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedsvc.errors import ConfigError
from embedsvc.files import sha256_file, write_atomic

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
# A leading underscore, like _manifest.json: pyarrow, pandas, datasets, polars and Spark skip
# such files when they read the folder, so DIR reads as a Parquet dataset as it is.
ERRORS = "_errors.jsonl"
FORMAT_VERSION = 1
ROW_GROUP_ROWS = 8192
ROW_GROUP_BYTES = 64 << 20  # a row group also ends past this many bytes of columns
SHARD_BYTES = 1 << 30  # a shard is committed past this many bytes of columns
COMMIT_SECONDS = 60.0  # and once it has been open this long, whatever its size


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

    def next_row(self) -> int:
        """The first input row no committed shard holds (shards are consecutive ranges)."""
        return sum(int(s["input_rows"]) for s in self.shards)


def job_file(name: str, own: tuple[str, ...] = ()) -> bool:
    """Whether a file of this name is one a job writes (what --overwrite may remove)."""
    return (
        re.fullmatch(r"part-\d{5}\.parquet(\.tmp)?", name) is not None
        or name in (MANIFEST, MANIFEST + ".tmp", ERRORS)
        or name in own
    )


def check_not_inside(out: Path, inputs: list[str]) -> None:
    """Refuse an output folder that holds an input (--overwrite would empty it, a rerun
    would read its own output), or an input folder that holds the output."""
    where = out.resolve()
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            continue  # a dataset name or a pattern, not a path on this machine
        source = path.resolve()
        if source == where or where in source.parents:
            raise ConfigError(
                f"the output folder {out} holds the input {raw}; choose an output folder of its own"
            )
        if source.is_dir() and source in where.parents:
            raise ConfigError(
                f"the output folder {out} is inside the input folder {raw}, so a rerun would "
                "read its own output; choose an output folder outside it"
            )


def open_output(
    out: Path,
    job: dict[str, Any],
    overwrite: bool,
    errors_name: str = ERRORS,
    inputs: list[str] | None = None,
    own: tuple[str, ...] = (),
) -> Manifest:
    """The manifest to continue (same job, its committed shards checked), or a fresh one
    in a folder cleared of the files a job writes (`own`: more names of this job's)."""
    check_not_inside(out, inputs or [])
    own = (*own, errors_name)
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
            hint = ""
            if "model_precision" in differ:  # dtype auto decided otherwise on this machine
                hint = f" (or EMBEDSVC_DTYPE={was.get('model_precision') or 'float32'} to go on)"
            raise ConfigError(
                f"{out} holds the output of another job ({detail}); use another --output, "
                f"or --overwrite to start over{hint}"
            )
        m = Manifest(job, old.get("shards", []), int(old.get("errors_bytes", 0)))
        m.complete = bool(old.get("complete"))
        m.summary = old.get("summary", {})
        committed = len(m.shards)
        _keep_good_shards(out, m)
        errors = out / errors_name
        size = errors.stat().st_size if errors.exists() else 0
        if size < m.errors_bytes:
            raise ConfigError(
                f"{errors} holds {size} bytes, fewer than the {m.errors_bytes} its manifest "
                "recorded: it was changed since; use --overwrite to start over"
            )
        if size > m.errors_bytes:
            with open(errors, "r+b") as fh:  # error rows of a shard that did not finish
                fh.truncate(m.errors_bytes)
        if m.complete and len(m.shards) < committed:
            m.complete = False  # a finished job with a shard to redo
        return m
    if out.exists() and any(out.iterdir()) and not path.is_file() and not overwrite:
        raise ConfigError(f"{out} exists and is not an embedsvc output folder; choose another")
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():  # only what a job writes: never an input or another file
        if f.is_file() and job_file(f.name, own):
            f.unlink()
    m = Manifest(job)
    write_atomic(path, m.to_json())
    return m


def _keep_good_shards(out: Path, m: Manifest) -> None:
    """Check every committed shard (its file there, with the size and sha256 recorded);
    from the first that fails on, drop the shards and their error rows, to be redone."""
    for k, shard in enumerate(m.shards):
        problem = _shard_problem(out, shard)
        if problem is None:
            continue
        if any("errors_bytes" not in s for s in m.shards[k:]):
            raise ConfigError(
                f"{out}: {problem}, and this manifest predates per-shard error offsets; "
                "use --overwrite to start over"
            )
        log.warning(
            "%s: %s; redoing it and the %d shards after it", out, problem, len(m.shards) - k - 1
        )
        m.errors_bytes = int(m.shards[k - 1]["errors_bytes"]) if k else 0
        for later in m.shards[k:]:
            if later.get("file"):
                (out / later["file"]).unlink(missing_ok=True)
        del m.shards[k:]
        write_atomic(out / MANIFEST, m.to_json())
        return


def _shard_problem(out: Path, shard: dict[str, Any]) -> str | None:
    name = shard.get("file")
    if not name:
        return None  # every row of it failed: no file
    path = out / name
    if not path.is_file():
        return f"shard {name} is missing"
    if path.stat().st_size != shard.get("bytes"):
        size, recorded = path.stat().st_size, shard.get("bytes")
        return f"shard {name} has {size} bytes, not the {recorded} recorded"
    if sha256_file(path) != shard.get("sha256"):
        return f"shard {name} differs from the file committed (sha256)"
    return None


class ShardWriter:
    """One Parquet shard: columns id, n_tokens and the outputs asked: embedding
    (fixed-size list of `dtype`), sparse (list<struct<index: int32, value: float32>>: the
    non-zero weights), multivector (list of fixed-size lists of `dtype`: one per token)."""

    def __init__(
        self,
        out: Path,
        index: int,
        first_row: int,
        dim: int,
        dtype: str,
        outputs: tuple[str, ...] = ("dense",),
    ) -> None:
        self.out = out
        self.outputs = outputs
        self.index = index
        self.first_row = first_row
        self.name = f"part-{index:05d}.parquet"
        self.tmp = out / (self.name + ".tmp")
        self.dim = dim
        self.dtype = dtype
        self.rows = 0
        self.failed = 0
        self.tokens = 0
        self.bytes = 0  # of the columns added, as written (about the file's size)
        self._writer: Any = None
        self._pending: list[Any] = []  # bulk.job.Chunk
        self._pending_rows = 0
        self._pending_bytes = 0

    def add(self, chunk: Any) -> None:
        """The rows of a bulk.job.Chunk that embedded."""
        size = _chunk_bytes(chunk, np.dtype(self.dtype).itemsize)
        self._pending.append(chunk)
        self._pending_rows += len(chunk.ids)
        self._pending_bytes += size
        self.rows += len(chunk.ids)
        self.tokens += sum(chunk.tokens)
        self.bytes += size
        if self._pending_rows >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_BYTES:
            self._write()

    def _write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        chunks, self._pending, self._pending_rows, self._pending_bytes = self._pending, [], 0, 0
        ids = [i for chunk in chunks for i in chunk.ids]
        n_tokens = [n for chunk in chunks for n in chunk.tokens]
        id_type = pa.int64() if all(isinstance(i, int) for i in ids) else pa.string()
        columns: dict[str, Any] = {
            "id": pa.array(ids if id_type == pa.int64() else [str(i) for i in ids], id_type)
        }
        if "dense" in self.outputs:
            vectors = np.concatenate([chunk.vectors for chunk in chunks]).astype(self.dtype)
            flat = pa.array(vectors.reshape(-1), type=pa.from_numpy_dtype(vectors.dtype))
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, self.dim)
        if "sparse" in self.outputs:
            columns["sparse"] = _sparse_column([r for c in chunks for r in c.sparse or []])
        if "multivector" in self.outputs:
            rows = [r for c in chunks for r in c.multivector or []]
            columns["multivector"] = _token_column(rows, self.dtype)
        columns["n_tokens"] = pa.array(n_tokens, pa.int32())
        table = pa.table(columns)
        if self._writer is None:
            self._writer = pq.ParquetWriter(str(self.tmp), table.schema)
        elif table.schema != self._writer.schema:
            table = table.cast(self._writer.schema)
        self._writer.write_table(table, row_group_size=max(len(ids), 1))  # one group

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


def _chunk_bytes(chunk: Any, itemsize: int) -> int:
    """About what a chunk's columns take in a row group: its dense vectors and token
    vectors at the output dtype, 8 bytes a sparse entry, 16 a row for id and tokens."""
    size = chunk.vectors.size * itemsize + 16 * len(chunk.ids)
    size += sum(r.size for r in chunk.multivector or []) * itemsize
    size += sum(len(r[0]) for r in chunk.sparse or []) * 8
    return int(size)


def _offsets(lengths: list[int]) -> Any:
    import pyarrow as pa

    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))


def _sparse_column(rows: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    """list<struct<index: int32, value: float32>>: each row's non-zero weights by index."""
    import pyarrow as pa

    index = np.concatenate([r[0] for r in rows] or [np.empty(0)]).astype(np.int32)
    value = np.concatenate([r[1] for r in rows] or [np.empty(0)]).astype(np.float32)
    entries = pa.StructArray.from_arrays([pa.array(index), pa.array(value)], ["index", "value"])
    return pa.ListArray.from_arrays(_offsets([len(r[0]) for r in rows]), entries)


def _token_column(rows: list[np.ndarray], dtype: str) -> Any:
    """list<fixed_size_list<dtype, d>>: each row's token vectors."""
    import pyarrow as pa

    d = next((r.shape[1] for r in rows if r.ndim == 2 and r.shape[1]), 1)
    flat = np.concatenate([r.reshape(-1) for r in rows] or [np.empty(0)]).astype(dtype)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat), d)
    return pa.ListArray.from_arrays(_offsets([len(r) for r in rows]), vectors)


class OutputWriter:
    """Chunks, in input order, into shards and errors.jsonl. A shard is a range of
    consecutive input rows, committed (file renamed into place, errors synced, manifest
    updated) when its segment of --shard-rows rows ends, when its columns pass
    SHARD_BYTES, when it has been open `commit_seconds`, or when the job finishes or is
    stopped: an interrupted job loses at most what it embedded since the last commit.
    Called from one thread at a time."""

    def __init__(
        self,
        out: Path,
        manifest: Manifest,
        shard_rows: int,
        dim: int,
        dtype: str,
        outputs: tuple[str, ...] = ("dense",),
        commit_seconds: float = COMMIT_SECONDS,
    ):
        self.out = out
        self.manifest = manifest
        self.shard_rows = shard_rows
        self.dim = dim
        self.dtype = dtype
        self.outputs = outputs
        self.commit_seconds = commit_seconds
        self.errors = open(out / ERRORS, "ab")  # noqa: SIM115 (closed by close())
        self._shard: ShardWriter | None = None
        self._segment = -1
        self._opened = 0.0
        self._input_rows = 0

    def add(self, chunk: Any) -> None:
        if self._shard is not None and self._segment != chunk.segment:
            self.finish()
        if self._shard is None:
            index = len(self.manifest.shards)
            self._shard = ShardWriter(
                self.out, index, chunk.first_row, self.dim, self.dtype, self.outputs
            )
            self._segment, self._opened = chunk.segment, time.monotonic()
        shard = self._shard
        if chunk.ids:
            shard.add(chunk)
        shard.failed += len(chunk.errors)
        self._input_rows += chunk.input_rows
        for line in chunk.errors:
            self.errors.write(line)
        full = self._input_rows >= self.shard_rows or shard.bytes >= SHARD_BYTES
        if full or time.monotonic() - self._opened >= self.commit_seconds:
            self.finish()

    def finish(self) -> None:
        """Commit the shard in progress, if any."""
        if self._shard is None:
            return
        record = self._shard.close(self._input_rows)
        self.errors.flush()
        os.fsync(self.errors.fileno())
        record["errors_bytes"] = self.errors.tell()  # where a redo of the next one cuts
        self.manifest.shards.append(record)
        self.manifest.errors_bytes = self.errors.tell()
        write_atomic(self.out / MANIFEST, self.manifest.to_json())
        self._shard, self._input_rows = None, 0

    def close(self) -> None:
        self.errors.close()
