"""The floor: a server that runs one SentenceTransformer.encode per request.

This is what a first attempt usually looks like (FastAPI + a thread pool, no batching
across requests). Run: python bench/naive_server.py MODEL_DIR PORT
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer


class Body(BaseModel):
    inputs: str | list[str]


def main() -> None:
    model = SentenceTransformer(sys.argv[1], device="cpu", local_files_only=True)
    app = FastAPI()

    @app.post("/embed")
    async def embed(body: Body) -> list[list[float]]:
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        vecs = await run_in_threadpool(model.encode, texts, normalize_embeddings=True)
        return vecs.tolist()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")


if __name__ == "__main__":
    main()
