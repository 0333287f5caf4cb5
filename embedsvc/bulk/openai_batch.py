"""`embedsvc embed FILE --format openai-batch`: an OpenAI Batch API input file, run locally.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/embeddings", "body"}`; the
body is read exactly as `POST /v1/embeddings` reads a request (the same validation, model
lookup, prompts and errors), and `model` names a served model. Answers go to
`DIR/output.jsonl` and failed lines to `DIR/errors.jsonl`, as OpenAI splits its output and
error files, each line `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}` in input order. The manifest records how many lines and bytes of each file are
final, every COMMIT_LINES lines, so a rerun continues after the last commit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from embedsvc.api.bodies import OpenAIEmbeddingsBody, convert
from embedsvc.api.encode import openai_embeddings_body
from embedsvc.api.errors import error_body
from embedsvc.api.openai import openai_request
from embedsvc.api.service import Service
from embedsvc.bulk.job import EXIT_ROWS_FAILED
from embedsvc.bulk.output import MANIFEST, open_output
from embedsvc.bulk.progress import Progress
from embedsvc.bulk.sources import digest
from embedsvc.bulk.spec import engine_settings, load
from embedsvc.errors import ConfigError, EmbedsvcError
from embedsvc.files import write_atomic
from embedsvc.metrics import Metrics

log = logging.getLogger("embedsvc.embed")

OUTPUT = "output.jsonl"
ERRORS = "errors.jsonl"  # OpenAI's pair of output and error files
COMMIT_LINES = 1000
WINDOW = 64  # lines in flight
URLS = ("/v1/embeddings", "/embeddings")


def models_named(path: Path) -> list[str]:
    """The `body.model` values of a batch file, in order of first appearance."""
    seen: dict[str, None] = {}
    with open(path, "rb") as f:
        for line in f:
            try:
                model = orjson.loads(line).get("body", {}).get("model")
            except (ValueError, AttributeError):
                continue
            if isinstance(model, str):
                seen.setdefault(model)
    return list(seen)


def run_batch_file(
    path: Path, out: Path, models_file: str | None, model: str | None, overwrite: bool
) -> int:
    from embedsvc.registry import load_registry

    settings = engine_settings()
    registry = load_registry(models_file or settings.models_file or None)
    wanted = [model] if model else [m for m in models_named(path) if m in registry.models]
    engines = load(models_file, wanted, settings)
    service = Service(settings, Metrics())
    service.engines = engines
    job = {
        "format": "openai-batch",
        "input": str(path.resolve()),
        "input_fingerprint": digest(path.parent, [path]),
        "models": {e.name: f"{e.spec.hf_id}@{e.spec.revision}" for e in engines},
    }
    try:
        manifest = open_output(out, job, overwrite, ERRORS, inputs=[str(path)], own=(OUTPUT,))
        if manifest.complete:
            log.info("%s is complete already: %s", out, manifest.summary)
            return EXIT_ROWS_FAILED if manifest.summary.get("failed") else 0
        return asyncio.run(_run(path, out, service, manifest))
    finally:
        engines.stop()


async def answer(service: Service, line: bytes, n: int) -> tuple[bool, bytes]:
    """(ok, output line) for input line number `n` (from 1)."""
    rid = "batch_req_" + secrets.token_hex(12)
    custom_id: Any = None
    try:
        request = orjson.loads(line)
        if not isinstance(request, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        return False, _line(rid, None, None, {"code": "invalid_json", "message": f"line {n}: {e}"})
    custom_id = request.get("custom_id")
    problem = None
    if not isinstance(custom_id, str) or not custom_id:
        problem = "custom_id must be a non-empty string"
    elif request.get("method") != "POST":
        problem = f"method must be POST, got {request.get('method')!r}"
    elif request.get("url") not in URLS:
        problem = f"url must be /v1/embeddings, got {request.get('url')!r}"
    elif not isinstance(request.get("body"), dict):
        problem = "body must be a JSON object"
    if problem:
        error = {"code": "invalid_request", "message": f"line {n}: {problem}"}
        return False, _line(rid, custom_id, None, error)
    try:
        body = convert(OpenAIEmbeddingsBody, request["body"])
        engine, req = openai_request(service, body, rid, None)
        result = await engine.embed(req)
    except EmbedsvcError as e:
        status, payload = error_body("openai", e.kind, e.message, e.param)
        return False, _line(
            rid, custom_id, {"status_code": status, "request_id": rid, "body": payload}, None
        )
    payload = orjson.loads(
        openai_embeddings_body(result, body.encoding_format, body.model or engine.name)
    )
    return True, _line(
        rid, custom_id, {"status_code": 200, "request_id": rid, "body": payload}, None
    )


def _custom_id(line: bytes) -> str | None:
    try:
        request = orjson.loads(line)
    except ValueError:
        return None
    custom_id = request.get("custom_id") if isinstance(request, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def _duplicate(custom_id: str | None, n: int) -> asyncio.Future[tuple[bool, bytes]]:
    """The error line of a custom_id an earlier line used (OpenAI refuses such files;
    here the first line is answered and each repeat is an error)."""
    rid = "batch_req_" + secrets.token_hex(12)
    message = f"line {n}: custom_id {custom_id!r} is used by an earlier line; each must be unique"
    done: asyncio.Future[tuple[bool, bytes]] = asyncio.get_running_loop().create_future()
    done.set_result(
        (False, _line(rid, custom_id, None, {"code": "duplicate_custom_id", "message": message}))
    )
    return done


def _line(rid: str, custom_id: Any, response: Any, error: Any) -> bytes:
    record = {"id": rid, "custom_id": custom_id, "response": response, "error": error}
    return orjson.dumps(record) + b"\n"


async def _run(path: Path, out: Path, service: Service, manifest: Any) -> int:
    assert service.engines is not None
    service.engines.start(asyncio.get_running_loop())
    state = manifest.summary.get("progress") or {"lines": 0, "output_bytes": 0, "failed": 0}
    outputs = out / OUTPUT
    size = outputs.stat().st_size if outputs.exists() else 0
    if size < state["output_bytes"]:
        raise ConfigError(
            f"{outputs} holds {size} bytes, fewer than the {state['output_bytes']} its "
            "manifest recorded: it was changed since; use --overwrite to start over"
        )
    with open(outputs, "ab") as fh:
        fh.truncate(state["output_bytes"])  # lines after the last commit are redone
    with open(path, "rb") as f:
        total = sum(1 for line in f if line.strip())
    progress = Progress(total, state["lines"], unit="lines")
    ok_out = open(outputs, "ab")  # noqa: SIM115 (closed below)
    err_out = open(out / ERRORS, "ab")  # noqa: SIM115 (closed below)
    inflight: deque[asyncio.Future[tuple[bool, bytes]]] = deque()
    seen: set[str] = set()  # custom_ids so far, earlier runs' lines included
    lines_done = state["lines"]
    failed = state["failed"]

    def commit() -> None:
        for f in (ok_out, err_out):
            f.flush()
            os.fsync(f.fileno())
        manifest.errors_bytes = err_out.tell()
        manifest.summary = {
            "progress": {"lines": lines_done, "output_bytes": ok_out.tell(), "failed": failed}
        }
        write_atomic(out / MANIFEST, manifest.to_json())

    async def settle() -> None:
        nonlocal lines_done, failed
        ok, text = await inflight.popleft()
        (ok_out if ok else err_out).write(text)
        lines_done += 1
        failed += not ok
        progress.advance(1, 0, int(not ok))
        if lines_done % COMMIT_LINES == 0:
            commit()

    try:
        n = 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                n += 1
                custom_id = _custom_id(line)
                repeated = custom_id in seen
                if custom_id is not None:
                    seen.add(custom_id)
                if n <= state["lines"]:
                    continue  # answered by an earlier run
                if repeated:
                    inflight.append(_duplicate(custom_id, number))
                else:
                    inflight.append(asyncio.ensure_future(answer(service, line, number)))
                if len(inflight) >= WINDOW:
                    await settle()
        while inflight:
            await settle()
        commit()
    finally:
        progress.close()
        ok_out.close()
        err_out.close()
    manifest.complete = True
    manifest.summary = {"lines": lines_done, "failed": failed, "output": OUTPUT, "errors": ERRORS}
    write_atomic(out / MANIFEST, manifest.to_json())
    log.info(
        "done: %d lines, %d failed (%s), answers in %s", lines_done, failed, out / ERRORS, outputs
    )
    return EXIT_ROWS_FAILED if failed else 0
