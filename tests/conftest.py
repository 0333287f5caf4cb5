"""Shared fixtures: tiny models, a models.yaml, and real uvicorn servers on loopback.

The tests are laid out like the code's kinds of work, each directory a pytest marker:
tests/unit (no sockets, no processes), tests/api (one server in this process, real
clients), tests/integration (processes, signals, bulk jobs, Ray, the bench scripts).
`make test-unit` runs the first alone; helpers live in tests/support."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from embedsvc.registry import Registry, load_registry
from tests.support import Server, ServerProcess, run_server
from tests.support.models import (
    MINILM_PATH,
    build_tiny_bert,
    build_tiny_cross_encoder,
    build_tiny_splade,
    write_models_yaml,
)

# Every server and job the tests start in another process computes in float32, as
# run_server's do, on whatever CPU runs them: the tests compare with float32 references
# at 1e-5, and dtype auto picks bfloat16 on a CPU with bf16 units (its own tests:
# tests/api/test_dtype_auto.py).
os.environ.setdefault("EMBEDSVC_DTYPE", "float32")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    bge = build_tiny_bert(root / "tiny-bge", pooling="cls", seed=1, max_seq_length=64)
    nomic = build_tiny_bert(root / "tiny-nomic", pooling="mean", seed=2, shift_bias=True)
    big = build_tiny_bert(root / "tiny-bigvocab", pooling="mean", seed=3, extra_vocab=100_000)
    reranker = build_tiny_cross_encoder(root / "tiny-reranker", seed=4)
    splade = build_tiny_splade(root / "tiny-splade", seed=5)
    write_models_yaml(root / "models.yaml", bge, nomic, big, reranker, splade)
    return root


@pytest.fixture(scope="session")
def registry(model_dir: Path) -> Registry:
    return load_registry(model_dir / "models.yaml")


@pytest.fixture(scope="session")
def st_minilm() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MINILM_PATH), device="cpu", local_files_only=True)


# API tests run twice in these modules: through embedsvc's HTTP protocol with its direct
# route, and through uvicorn's own protocol (--no-http-direct, and what serves when the
# installed uvicorn lacks what the direct route needs).
BOTH_PROTOCOLS = {
    "test_clients",
    "test_connection_limits",
    "test_errors",
    "test_hostile",
    "test_rerank",
    "test_similarity",
    "test_sparse",
    "test_tei_contract",
}


KINDS = ("unit", "api", "integration")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test gets its directory's marker (`pytest -m unit`)."""
    for item in items:
        kind = Path(str(item.path)).parent.name
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if "http_direct" in metafunc.fixturenames and module in BOTH_PROTOCOLS:
        metafunc.parametrize(
            "http_direct", [True, False], ids=["direct", "stock"], indirect=True, scope="session"
        )


@pytest.fixture(scope="session")
def http_direct(request: pytest.FixtureRequest) -> bool:
    """Settings.http_direct of the test servers (True but in BOTH_PROTOCOLS modules)."""
    return bool(getattr(request, "param", True))


@pytest.fixture(scope="session")
def server(registry: Registry, http_direct: bool) -> Iterator[Server]:
    """One server with all the test models (MiniLM is the default)."""
    models = ["all-minilm-l6-v2", "tiny-bge", "tiny-nomic", "tiny-e5"]
    with run_server(registry, models, http_direct=http_direct) as s:
        yield s


@pytest.fixture()
def server_factory(registry: Registry, http_direct: bool) -> Callable[..., Any]:
    """Start a dedicated server with other settings: `with server_factory(models, **kw)`."""

    def make(models: list[str] | None = None, **overrides: Any) -> Any:
        overrides.setdefault("http_direct", http_direct)
        return run_server(registry, models or ["all-minilm-l6-v2"], **overrides)

    return make


@pytest.fixture()
def spawn() -> Iterator[Any]:
    started: list[ServerProcess] = []

    def make(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        p = ServerProcess(*args, env=env)
        started.append(p)
        return p

    yield make
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.communicate()
