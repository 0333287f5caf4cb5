"""Load test for embedsvc: both dialects, weighted batch sizes, a query/passage mix.

Headless, against a local server, for a fixed time (see README "Load test"). With
EMBEDSVC_LOADTEST_RERANK_MODEL set to a served reranker, rerank users join in (1 query x
20-100 passages on /v1/rerank):

    locust -f loadtest/locustfile.py --headless -u 64 -r 16 -t 60s \
        --host http://127.0.0.1:8080 --csv loadtest/results/run

The server's timing headers (x-tokenization-time, x-queue-time, x-inference-time,
x-total-time) are recorded as their own rows (request type "server"), next to the
client-side response times, so the table shows where the time goes.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from locust import FastHttpUser, between, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from workload import passage, query

MODEL = os.environ.get("EMBEDSVC_LOADTEST_MODEL", "all-minilm-l6-v2")
# Batch sizes a RAG application sends: mostly single queries, some passage batches.
BATCH_SIZES = [1, 1, 1, 1, 1, 1, 4, 8, 16, 32]
TIMING_HEADERS = ("x-tokenization-time", "x-queue-time", "x-inference-time", "x-total-time")


class EmbedUser(FastHttpUser):
    abstract = True
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.rng = random.Random()

    def inputs(self) -> tuple[list[str], str]:
        n = self.rng.choice(BATCH_SIZES)
        if n == 1 and self.rng.random() < 0.7:
            return [query(self.rng)], "query"
        return [passage(self.rng) for _ in range(n)], "passage"

    def post(self, path: str, body: dict, n: int) -> None:
        """POST and record the server's timing headers; non-200 answers count as failures."""
        with self.client.post(path, json=body, name=f"{path} [{n}]", catch_response=True) as r:
            if r.status_code == 200:
                self.record(r, path)
            else:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    def record(self, response, name: str) -> None:
        for header in TIMING_HEADERS:
            value = response.headers.get(header)
            if value is not None:
                self.environment.events.request.fire(
                    request_type="server",
                    name=f"{name} {header}",
                    response_time=float(value),
                    response_length=0,
                    exception=None,
                    context={},
                )


class TEIUser(EmbedUser):
    weight = 1

    @task
    def embed(self) -> None:
        texts, _ = self.inputs()
        self.post("/embed", {"inputs": texts, "truncate": True, "model": MODEL}, len(texts))


class OpenAIUser(EmbedUser):
    weight = 1

    @task
    def embeddings(self) -> None:
        texts, kind = self.inputs()
        body = {
            "input": texts,
            "model": MODEL,
            "input_type": kind,
            "truncate": True,
            "encoding_format": "base64",
        }
        self.post("/v1/embeddings", body, len(texts))


RERANK_MODEL = os.environ.get("EMBEDSVC_LOADTEST_RERANK_MODEL", "")


class RerankUser(EmbedUser):
    """One query with 20-100 retrieved passages, as a RAG app reranks its candidates. Runs
    when EMBEDSVC_LOADTEST_RERANK_MODEL names a served model with task: rerank."""

    abstract = not RERANK_MODEL
    weight = 1

    @task
    def rerank(self) -> None:
        docs = [passage(self.rng, (30, 120)) for _ in range(self.rng.randint(20, 100))]
        body = {"model": RERANK_MODEL, "query": query(self.rng), "documents": docs, "top_n": 10}
        self.post("/v1/rerank", body, len(docs))
