"""`embedsvc embed`: a dataset through the server's own engine, into Parquet shards.

No HTTP: the rows go through the same engine as requests do — prompts, truncation,
tokenization, length-sorted batching, forward passes, Matryoshka and normalization — so a
row's vector equals what `/embed` returns for its text. Requests of CHUNK rows are kept in
flight (WINDOW of them), which lets the engine tokenize on its threads ahead of the model and
sort queued inputs by length (`batch_policy: length`); results come back in order and are
written by a background thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedsvc.bulk.output import (
    ERRORS,
    MANIFEST,
    Manifest,
    OutputWriter,
    open_output,
)
from embedsvc.bulk.progress import Progress
from embedsvc.bulk.sources import MISSING, BadRow, Source, open_source
from embedsvc.bulk.spec import (
    CHUNK,
    WINDOW,
    Options,
    check_before_loading,
    check_options,
    describe_job,
    engine_settings,
    load,
    request_want,
    resolve_prompt_name,
)
from embedsvc.engine import EmbedRequest, EngineSet, ModelEngine, Texts
from embedsvc.engine.sparse import SparseRow
from embedsvc.errors import EmbedsvcError
from embedsvc.files import write_atomic

log = logging.getLogger("embedsvc.embed")

EXIT_ROWS_FAILED = 1
EXIT_STOPPED = 3
PASS_WATCH_SECONDS = 0.5  # how often progress reads the rows forward passes took
# Stopped by SIGINT (Ctrl-C) or SIGTERM: 128 + the signal's number, as a shell reports it.
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopJob(Exception):
    """--on-error fail: a row failed."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM while the job starts (before its event loop takes the signals)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def run(opts: Options) -> int:
    """Run the job on this machine (bulk/ray_job.py runs it on a Ray cluster). SIGINT and
    SIGTERM stop it cleanly at any point: what was embedded is committed, one line says
    how to resume, and the exit code is 128 + the signal's number."""
    check_options(opts)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in EXIT_INTERRUPTED}
    engines: EngineSet | None = None
    try:
        source = open_source(
            opts.input,
            opts.format,
            split=opts.split,
            revision=opts.revision,
            streaming=opts.streaming,
        )
        check_before_loading(opts, source)
        engines = load(opts.models_file, [opts.model] if opts.model else [], engine_settings())
        engine = engines.default
        prompt_name = resolve_prompt_name(engine, opts)
        job = describe_job(engine, opts, source.description, source.fingerprint)
        manifest = open_output(opts.output, job, opts.overwrite, inputs=[opts.input])
        if manifest.complete:
            log.info("%s is complete already: %s", opts.output, manifest.summary)
            return EXIT_ROWS_FAILED if manifest.summary.get("failed") else 0
        return asyncio.run(_run(engines, engine, source, opts, prompt_name, manifest))
    except Interrupted as stop:  # before any row was embedded: nothing to commit
        say_interrupted(stop.signum, opts.output, None)
        return EXIT_INTERRUPTED[signal.Signals(stop.signum)]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if engines is not None:
            engines.stop()


def say_interrupted(signum: int, out: Path, manifest: Manifest | None) -> None:
    """The one line an interrupted job leaves (on stderr, whatever the log level)."""
    name = signal.Signals(signum).name
    kept = (
        f"{manifest.next_row():,} input rows are committed in {out}"
        if manifest is not None
        else "no row was embedded yet"
    )
    print(
        f"embedsvc embed: stopped by {name}; {kept}. Run the same command again to resume.",
        file=sys.stderr,
    )


def chunks(
    source: Source, opts: Options, start_row: int = 0
) -> Iterator[tuple[int, int, list[Any], list[Any]]]:
    """(segment, first row, ids, texts) of up to CHUNK rows from `start_row` on (the
    rows before it are committed). Segments are --shard-rows rows counted from
    `start_row`, and no chunk crosses one's end: a shard holds at most one segment."""
    columns = [opts.text_column] + ([opts.id_column] if opts.id_column else [])
    row = 0
    for block in source.batches(columns):
        n = len(next(iter(block.values()))) if block else 0
        if row + n <= start_row:
            row += n
            continue
        texts = block.get(opts.text_column) or [MISSING] * n
        ids = block.get(opts.id_column or "")
        if ids is None or any(i is MISSING or i is None for i in ids):
            ids = [
                row + k if ids is None or ids[k] is MISSING or ids[k] is None else ids[k]
                for k in range(n)
            ]
        i = max(start_row - row, 0)
        while i < n:
            segment = (row + i - start_row) // opts.shard_rows
            end = min(n, i + CHUNK, start_row + (segment + 1) * opts.shard_rows - row)
            yield segment, row + i, ids[i:end], texts[i:end]
            i = end
        row += n


def bad_text(text: Any, column: str) -> str | None:
    if isinstance(text, BadRow):
        return str(text)
    if text is MISSING:
        return f"the row has no {column!r}"
    if text is None:
        return f"{column} is null"
    if not isinstance(text, str):
        return f"{column} is {type(text).__name__}, not text"
    if not text.strip():
        return f"{column} is empty"
    return None


@dataclass
class Chunk:
    """Up to CHUNK consecutive input rows of one segment (see `chunks`), embedded."""

    segment: int
    first_row: int
    input_rows: int
    ids: list[Any]  # of the rows that embedded, in input order
    vectors: np.ndarray  # [rows, dim] ([rows, 0] without the dense output)
    tokens: list[int]
    errors: list[bytes]  # errors.jsonl lines of the rows that did not
    sparse: list[SparseRow] | None = None  # per row, with the sparse output
    multivector: list[np.ndarray] | None = None  # per row [tokens, d], with multivector


class ChunkEmbedder:
    """Rows to a Chunk through one engine: bad rows become error lines, the rest one
    request (or, when one of them fails it, a request each, to find the bad ones)."""

    def __init__(self, engine: ModelEngine, opts: Options, prompt_name: str | None) -> None:
        self.engine = engine
        self.opts = opts
        self.prompt_name = prompt_name
        self.want = request_want(engine, opts.outputs)
        dense = "dense" in opts.outputs
        self.dim = (opts.dimensions or engine.dimension) if dense else 0

    def _request(self, texts: list[str]) -> EmbedRequest:
        return EmbedRequest(
            Texts(texts),
            want=self.want,
            prompt_name=self.prompt_name,
            instruction=self.opts.instruction,
            truncate=self.opts.truncate,
            dimensions=self.opts.dimensions,
            input_param=self.opts.text_column,
        )

    async def embed(self, segment: int, first_row: int, ids: list[Any], texts: list[Any]) -> Chunk:
        ok_ids, ok_rows, ok_texts, errors = [], [], [], []
        for k, (row_id, text) in enumerate(zip(ids, texts, strict=True)):
            reason = bad_text(text, self.opts.text_column)
            if reason is None:
                ok_ids.append(row_id)
                ok_rows.append(first_row + k)
                ok_texts.append(text)
            else:
                errors.append(error_line(row_id, first_row + k, reason))
        empty = np.zeros((0, self.dim), np.float32)
        chunk = Chunk(segment, first_row, len(ids), [], empty, [], [])
        if ok_texts:
            try:
                r = await self.engine.embed(self._request(ok_texts))
                chunk.ids, chunk.vectors, chunk.tokens = ok_ids, r.vectors, r.input_tokens
                chunk.sparse, chunk.multivector = r.sparse, r.tokens
            except EmbedsvcError as e:
                if len(ok_texts) == 1:
                    errors.append(error_line(ok_ids[0], ok_rows[0], e.message))
                else:
                    await self._one_by_one(chunk, ok_ids, ok_rows, ok_texts, errors)
        chunk.errors = sorted(errors, key=lambda line: json.loads(line)["row"])
        return chunk

    async def _one_by_one(
        self, chunk: Chunk, ids: list[Any], rows: list[int], texts: list[str], errors: list[bytes]
    ) -> None:
        vectors = []
        sparse: list[SparseRow] = []
        multivector: list[np.ndarray] = []
        for row_id, row, text in zip(ids, rows, texts, strict=True):
            try:
                r = await self.engine.embed(self._request([text]))
            except EmbedsvcError as e:
                errors.append(error_line(row_id, row, e.message))
                continue
            chunk.ids.append(row_id)
            vectors.append(r.vectors[0])
            chunk.tokens.append(r.input_tokens[0])
            sparse.extend(r.sparse or [])
            multivector.extend(r.tokens or [])
        chunk.vectors = np.array(vectors, np.float32).reshape(-1, self.dim)
        chunk.sparse = sparse if "sparse" in self.opts.outputs else None
        chunk.multivector = multivector if "multivector" in self.opts.outputs else None


async def _run(
    engines: EngineSet,
    engine: ModelEngine,
    source: Source,
    opts: Options,
    prompt_name: str | None,
    manifest: Manifest,
) -> int:
    """The job's loop: chunks read, embedded (a window of them in flight), written in
    order by a background thread, and stopped cleanly by a signal or --on-error fail;
    the exit code. About 100 lines kept whole (a reason, against the 80-line rule): the
    in-flight window, the writer and the signal handlers share state that every way out
    (end, first or second signal, a failed chunk) must settle in the same order."""
    loop = asyncio.get_running_loop()
    engines.start(loop)
    embedder = ChunkEmbedder(engine, opts, prompt_name)
    writer = OutputWriter(
        opts.output,
        manifest,
        opts.shard_rows,
        embedder.dim,
        opts.dtype,
        opts.outputs,
        opts.commit_seconds,
    )
    background = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
    progress = Progress(_total_rows(source), manifest.next_row())
    t0 = time.monotonic()
    inflight: deque[asyncio.Task[Chunk]] = deque()
    last_write: Any = None
    stop = asyncio.Event()
    stopped_by: list[int] = []

    def on_signal(signum: int) -> None:
        if stopped_by:  # a second one: stop now, the shard in progress left uncommitted
            print("embedsvc embed: stopping at once; rerun to resume", file=sys.stderr)
            progress.close()
            os._exit(EXIT_INTERRUPTED[signal.Signals(signum)])
        stopped_by.append(signum)
        stop.set()

    for sig in EXIT_INTERRUPTED:
        loop.add_signal_handler(sig, on_signal, sig)
    watcher = asyncio.ensure_future(_watch_passes(engines, engine.name, progress))

    def counted(task: asyncio.Task[Chunk]) -> None:  # progress as chunks finish, in any order
        if not task.cancelled() and task.exception() is None:
            chunk = task.result()
            progress.advance(chunk.input_rows, sum(chunk.tokens), len(chunk.errors))

    async def settle_one() -> None:
        nonlocal last_write
        chunk = await inflight.popleft()
        if chunk.errors and opts.on_error == "fail":
            raise StopJob(json.loads(chunk.errors[0])["error"])
        last_write = loop.run_in_executor(background, writer.add, chunk)

    code = 0
    try:
        for segment, first_row, ids, texts in chunks(source, opts, manifest.next_row()):
            if stop.is_set():
                break
            task = asyncio.ensure_future(embedder.embed(segment, first_row, ids, texts))
            task.add_done_callback(counted)
            inflight.append(task)
            while inflight and (inflight[0].done() or len(inflight) >= WINDOW):
                await _first(inflight[0], stop)
                if stop.is_set():
                    break
                await settle_one()
            await asyncio.sleep(0)  # a signal's handler runs between chunks read
        while inflight and not stop.is_set():
            await _first(inflight[0], stop)
            if not stop.is_set():
                await settle_one()
        if stop.is_set():  # what finished in order is kept; the rest is done again
            while inflight and inflight[0].done() and not inflight[0].cancelled():
                await settle_one()
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
        if last_write is not None:
            await last_write
        await loop.run_in_executor(background, writer.finish)
    except StopJob as e:
        for task in inflight:
            task.cancel()
        if last_write is not None:
            await last_write  # the shard in progress stays uncommitted: a rerun redoes it
        log.error("stopped (--on-error fail): %s", e)
        code = EXIT_STOPPED
    finally:
        watcher.cancel()
        for sig in EXIT_INTERRUPTED:
            loop.remove_signal_handler(sig)
        progress.close()
        background.shutdown(wait=True)
        writer.close()
    if stopped_by:
        say_interrupted(stopped_by[0], opts.output, manifest)
        return EXIT_INTERRUPTED[signal.Signals(stopped_by[0])]
    if code == EXIT_STOPPED:
        return code
    return finish(opts.output, manifest, progress, time.monotonic() - t0)


async def _watch_passes(engines: EngineSet, model: str, progress: Progress) -> None:
    """Progress from the first forward pass on: the rows the model has taken so far."""
    registry = engines.front.metrics.registry
    labels = {"model": model}

    def taken() -> float:
        return registry.get_sample_value("embedsvc_batch_size_sum", labels) or 0.0

    start = taken()
    while True:
        await asyncio.sleep(PASS_WATCH_SECONDS)
        progress.passed(int(taken() - start))


async def _first(task: asyncio.Task[Chunk], stop: asyncio.Event) -> None:
    """Until `task` is done or the job is asked to stop."""
    if task.done():
        return
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()


def finish(out: Path, manifest: Manifest, progress: Progress, elapsed: float) -> int:
    """Mark the job complete, log the summary, and give the exit code."""
    shards = manifest.shards
    rows = sum(s["rows"] for s in shards)
    failed = sum(s["failed"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    size = sum(s.get("bytes", 0) for s in shards)
    rows_s, tokens_s = progress.rates()
    manifest.complete = True
    manifest.summary = {
        "rows": rows,
        "failed": failed,
        "tokens": tokens,
        "this_run_seconds": round(elapsed, 3),
        "this_run_rows_per_second": round(rows_s, 1),
        "this_run_tokens_per_second": round(tokens_s, 1),
        "output_bytes": size,
    }
    write_atomic(out / MANIFEST, manifest.to_json())
    log.info(
        "done: %s rows embedded, %s failed (see %s), %s tokens in %.1f s this run "
        "(%.0f rows/s, %.0f tokens/s); output %s in %d shards, %.1f MB",
        f"{rows:,}",
        f"{failed:,}",
        out / ERRORS,
        f"{tokens:,}",
        elapsed,
        rows_s,
        tokens_s,
        out,
        len([s for s in shards if s.get("file")]),
        size / 1e6,
    )
    return EXIT_ROWS_FAILED if failed else 0


def error_line(row_id: Any, row: int, message: str) -> bytes:
    return (json.dumps({"id": row_id, "row": row, "error": message}, default=str) + "\n").encode()


def _total_rows(source: Source) -> int | None:
    return source.description.get("rows")
