"""Every engine route, as declared once (api/calls.Route in the dialect modules), is
decoded, answered, counted under its metric label and documented in /openapi.json: a
route added without a sample body here fails the first assertion."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from embedsvc.api.bodies import decode
from embedsvc.api.routes import ROUTES
from embedsvc.registry import load_registry
from tests.support import Server, run_server
from tests.support.models import build_tiny_cross_encoder, build_tiny_m3

# One valid body per declared path.
SAMPLES: dict[str, dict[str, Any]] = {
    "/embed": {"inputs": ["a river", "the sea"], "model": "tiny-bge"},
    "/": {"inputs": "a river", "model": "tiny-bge"},
    "/embed_multivector": {"inputs": "a river", "model": "tiny-m3"},
    "/embed_all": {"inputs": "a river", "model": "tiny-bge"},
    "/encode": {"inputs": ["a river"], "model": "tiny-m3", "outputs": ["dense", "multivector"]},
    "/embed_sparse": {"inputs": "a river", "model": "tiny-splade"},
    "/similarity": {
        "inputs": {"source_sentence": "a river", "sentences": ["the sea", "a hill"]},
        "model": "tiny-bge",
    },
    "/v1/embeddings": {"input": ["a river"], "model": "tiny-bge"},
    "/embeddings": {"input": "a river", "model": "tiny-bge"},
    "/rerank": {"query": "a river", "texts": ["the sea", "a hill"], "model": "tiny-reranker"},
    "/v1/rerank": {"query": "a river", "documents": ["the sea"], "model": "tiny-reranker"},
    "/v2/embed": {"texts": ["a river"], "model": "tiny-bge", "input_type": "search_query"},
    "/predict": {"inputs": [["a river"], ["a river", "the sea"]], "model": "tiny-cls"},
    "/classify": {"input": ["a river"], "model": "tiny-cls"},
}


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("routes")
    m3 = build_tiny_m3(root / "tiny-m3", model_dir / "tiny-bge")
    labels = {0: "no", 1: "yes"}
    classifier = build_tiny_cross_encoder(root / "tiny-cls", seed=9, num_labels=2, id2label=labels)
    yaml = (model_dir / "models.yaml").read_text() + (
        f"  - name: tiny-m3\n    hf_id: test/tiny-m3\n    revision: '{'0' * 40}'\n"
        f"    local_dir: {m3}\n    pooling: cls\n    max_seq_length: 64\n"
        "    lexical_weights: true\n    multivector: true\n"
        f"  - name: tiny-cls\n    hf_id: test/tiny-cls\n    revision: '{'0' * 40}'\n"
        f"    local_dir: {classifier}\n    task: classify\n"
    )
    (root / "models.yaml").write_text(yaml)
    models = ["tiny-bge", "tiny-m3", "tiny-splade", "tiny-reranker", "tiny-cls"]
    with run_server(load_registry(root / "models.yaml"), models) as s:
        yield s


def test_every_declared_route_is_decoded_answered_counted_and_documented(server: Server) -> None:
    assert set(SAMPLES) == set(ROUTES), "a declared route needs a sample body here"
    with server.client() as c:
        openapi = c.get("/openapi.json").json()
        components = openapi["components"]["schemas"]
        for path, route in ROUTES.items():
            body = SAMPLES[path]
            decode(route.body, orjson.dumps(body))
            labels = {"model": body["model"], "route": route.label}
            before = server.metric("embedsvc_requests_total", **labels)
            bytes_before = server.metric("embedsvc_response_bytes_total", **labels)
            r = c.post(path, json=body)
            assert r.status_code == 200, (path, r.text)
            assert server.metric("embedsvc_requests_total", **labels) == before + 1, path
            grown = server.metric("embedsvc_response_bytes_total", **labels) - bytes_before
            assert grown == len(r.content), path

            operation = openapi["paths"][path]["post"]
            assert operation["summary"] == route.summary and operation["tags"] == [route.tag]
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{route.body.__name__}"}
            assert route.body.__name__ in components, path
    # The bodies the TEI tokenizer routes read are documented beside the engine routes'.
    for name in ("TEITokenizeBody", "TEIDecodeBody"):
        assert name in components
    assert components["TEIEmbedBody"]["required"] == ["inputs"]
    assert components["OpenAIEmbeddingsBody"]["properties"]["dimensions"]["anyOf"][0] == {
        "type": "integer",
        "exclusiveMinimum": 0,
    }


def test_an_alias_counts_under_its_route_label(server: Server) -> None:
    """/embeddings is /v1/embeddings and /v1/rerank is /rerank in embedsvc_requests."""
    assert ROUTES["/embeddings"].label == "/v1/embeddings"
    assert ROUTES["/v1/rerank"].label == "/rerank"
    labels = {"model": "tiny-reranker", "route": "/rerank"}
    before = server.metric("embedsvc_requests_total", **labels)
    with server.client() as c:
        assert c.post("/v1/rerank", json=SAMPLES["/v1/rerank"]).status_code == 200
    assert server.metric("embedsvc_requests_total", **labels) == before + 1


def test_a_stopped_app_leaves_no_model_behind(registry: Any) -> None:
    """FastAPI keeps every endpoint it has classified in a process-wide cache: an endpoint
    holding the app's engines kept each stopped app's models in memory for good (the test
    suite, which starts a server per module, grew by about 190 MB per server)."""
    with run_server(registry, ["tiny-bge"]) as s:
        assert s.client().post("/embed", json={"inputs": "a river"}).status_code == 200
        engines = weakref.ref(s.engines)
    del s
    gc.collect()
    assert engines() is None, [type(r).__name__ for r in gc.get_referrers(engines())]
