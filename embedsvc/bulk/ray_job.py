"""`embedsvc embed --ray [ADDRESS]`: the same job on a Ray cluster.

Ray Data reads the rows still to embed (one streaming read task over the same source
reader as on one machine, skipping the shards the manifest lists), `map_batches` hands them
to a pool of `EmbedActor`s — each loads the model once into the same engine the server uses
— and the driver receives the embedded chunks in input order (`preserve_order`) and writes
the same shards, `_errors.jsonl` and manifest as a single-machine run, so resume works the
same way and the output is the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from embedsvc.bulk.job import Chunk, ChunkEmbedder, chunks, finish
from embedsvc.bulk.output import OutputWriter, open_output
from embedsvc.bulk.progress import Progress
from embedsvc.bulk.sources import BadRow, open_source
from embedsvc.bulk.spec import (
    CHUNK,
    Options,
    check_before_loading,
    check_options,
    describe_job,
    engine_settings,
    load,
    resolve_prompt_name,
)
from embedsvc.errors import ConfigError

log = logging.getLogger("embedsvc.embed")

ROWS_PER_CALL = CHUNK * 4  # rows per map_batches call
BLOCK_BYTES = 64 * 1024


def _source(opts: Options) -> Any:
    return open_source(
        opts.input, opts.format, split=opts.split, revision=opts.revision, streaming=opts.streaming
    )


def _rows(opts: dict[str, Any], start_row: int) -> Iterator[Any]:
    """The read task: the rows no committed shard holds, as Arrow tables."""
    import pyarrow as pa

    o = Options(**opts)
    for segment, first_row, ids, texts in chunks(_source(o), o, start_row):
        yield pa.table(
            {
                "segment": pa.array([segment] * len(ids), pa.int64()),
                "row": pa.array(range(first_row, first_row + len(ids)), pa.int64()),
                "id": pa.array([json.dumps(i, default=str) for i in ids], pa.string()),
                # Non-text values travel as their reason; BadRow marks them again below.
                "text": pa.array([t if isinstance(t, str) else None for t in texts], pa.string()),
                "bad": pa.array(
                    [None if isinstance(t, str) else _describe(t, o.text_column) for t in texts],
                    pa.string(),
                ),
            }
        )


def _describe(value: Any, column: str) -> str:
    from embedsvc.bulk.job import bad_text

    return bad_text(value, column) or "not text"


class EmbedActor:
    """Holds one model in an engine, as a server process does; embeds batches of rows."""

    def __init__(self, opts: dict[str, Any], threads: int) -> None:
        o = Options(**opts)
        settings = engine_settings(threads=threads)
        self.engines = load(o.models_file, [o.model] if o.model else [], settings)
        engine = self.engines.default
        self.loop = asyncio.new_event_loop()
        self.engines.start(self.loop)
        self.embedder = ChunkEmbedder(engine, o, resolve_prompt_name(engine, o))

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        groups: list[tuple[int, int, list[Any], list[Any]]] = []
        for k, (segment, row) in enumerate(zip(cols["segment"], cols["row"], strict=True)):
            bad = cols["bad"][k]
            text = BadRow(bad) if bad is not None else cols["text"][k]
            row_id = json.loads(cols["id"][k])
            g = groups[-1] if groups else None
            if g is None or g[0] != segment or len(g[2]) >= CHUNK or g[1] + len(g[2]) != row:
                groups.append((segment, row, [row_id], [text]))
            else:
                g[2].append(row_id)
                g[3].append(text)

        async def embed_all() -> list[Chunk]:
            return await asyncio.gather(*(self.embedder.embed(*g) for g in groups))

        done = self.loop.run_until_complete(embed_all())
        return pa.table(
            {
                "segment": [c.segment for c in done],
                "first_row": [c.first_row for c in done],
                "input_rows": [c.input_rows for c in done],
                "ids": [json.dumps(c.ids, default=str) for c in done],
                "vectors": [np.ascontiguousarray(c.vectors, np.float32).tobytes() for c in done],
                "tokens": [c.tokens for c in done],
                "errors": [b"".join(c.errors) for c in done],
                # Sparse rows and token vectors, between this job's own processes.
                "per_token": [pickle.dumps((c.sparse, c.multivector)) for c in done],
            }
        )


def run_ray(opts: Options, address: str | None, num_actors: int) -> int:
    """Run the job on a Ray cluster at `address` ("" = a local one)."""
    check_options(opts)
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'embedsvc[ray]'") from None
    ray.init(address=address or None, logging_level=logging.WARNING, log_to_driver=False)
    try:
        return _run(ray, opts, num_actors)
    finally:
        ray.shutdown()


def _run(ray: Any, opts: Options, num_actors: int) -> int:
    source = _source(opts)
    check_before_loading(opts, source)
    job = ray.get(
        ray.remote(_describe_remote).remote(asdict(opts), source.description, source.fingerprint)
    )
    manifest = open_output(opts.output, job, opts.overwrite, inputs=[opts.input])
    if manifest.complete:
        log.info("%s is complete already: %s", opts.output, manifest.summary)
        return 1 if manifest.summary.get("failed") else 0
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = num_actors or max(gpus, 1)
    per_actor_cpus = max(1, cpus // actors) if not gpus else 1
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # Small blocks out of the one read task, so that its rows spread over every actor
    # (Ray would otherwise merge them into a few large blocks, each a task for one actor).
    ctx.target_max_block_size = BLOCK_BYTES
    start_row = manifest.next_row()
    # The read task asks for no CPU of its own: the actors hold every slot, and reading is
    # a small share of the work (a read task waiting for a slot would stall the job).
    source_rows = _PendingRows(asdict(opts), start_row)
    ds = ray.data.read_datasource(source_rows, override_num_blocks=1, num_cpus=0)
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"opts": asdict(opts), "threads": per_actor_cpus},
        batch_size=ROWS_PER_CALL,
        batch_format="pyarrow",
        # One call in flight per actor: otherwise the pool queues several on the first
        # actor while the others wait.
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_gpus=1 if gpus else 0,
        num_cpus=per_actor_cpus,
    )
    dim = int(job["dimensions"]) if "dense" in opts.outputs else 0
    writer = OutputWriter(
        opts.output,
        manifest,
        opts.shard_rows,
        dim,
        opts.dtype,
        tuple(opts.outputs),
        opts.commit_seconds,
    )
    progress = Progress(source.description.get("rows"), start_row)
    t0 = time.monotonic()
    log.info(
        "Ray: %d actor(s), %d CPU(s) each%s", actors, per_actor_cpus, " and a GPU" if gpus else ""
    )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for r in batch.to_pylist():
                vectors = np.frombuffer(r["vectors"], np.float32).reshape(-1, dim)
                errors = [line + b"\n" for line in r["errors"].split(b"\n") if line]
                chunk = Chunk(
                    r["segment"],
                    r["first_row"],
                    r["input_rows"],
                    json.loads(r["ids"]),
                    vectors,
                    list(r["tokens"]),
                    errors,
                    *pickle.loads(r["per_token"]),
                )
                if chunk.errors and opts.on_error == "fail":
                    log.error("stopped (--on-error fail): %s", json.loads(errors[0])["error"])
                    return 3
                writer.add(chunk)
                progress.advance(chunk.input_rows, sum(chunk.tokens), len(chunk.errors))
        writer.finish()
    finally:
        progress.close()
        writer.close()
    return finish(opts.output, manifest, progress, time.monotonic() - t0)


def _describe_remote(opts: dict[str, Any], description: dict[str, Any], fingerprint: str) -> Any:
    """The manifest's job fields, from the model as a worker loads it."""
    o = Options(**opts)
    engines = load(o.models_file, [o.model] if o.model else [], engine_settings())
    try:
        return describe_job(engines.default, o, description, fingerprint)
    finally:
        engines.stop()


def _datasource_class() -> Any:
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class PendingRows(Datasource):
        """One streaming read task: the rows no committed shard holds, in order."""

        def __init__(self, opts: dict[str, Any], start_row: int) -> None:
            self.opts = opts
            self.start_row = start_row

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, *args: Any, **kw: Any) -> list[Any]:
            opts, start_row = self.opts, self.start_row
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None)
            return [ReadTask(lambda: _rows(opts, start_row), meta)]

    return PendingRows


def _PendingRows(opts: dict[str, Any], start_row: int) -> Any:
    return _datasource_class()(opts, start_row)
