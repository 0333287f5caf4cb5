"""Integer output (int8, uint8, binary, ubinary) against sentence-transformers'
quantize_embeddings, with ranges from the fixed calibration texts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from embedsvc.engine.calibration import TEXTS as CALIBRATION
from tests.support import Server

TEXTS = ["how do vaccines work", "Paris is the capital of France.", "a sunny day at the lake"]


def post(server: Server, path: str, body: dict) -> Any:
    with server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("fmt", ["int8", "uint8", "binary", "ubinary"])
def test_integer_formats_equal_quantize_embeddings(
    server: Server, st_minilm: Any, fmt: str
) -> None:
    from sentence_transformers.quantization import quantize_embeddings

    calibration = st_minilm.encode(list(CALIBRATION), normalize_embeddings=True)
    floats = st_minilm.encode(TEXTS, normalize_embeddings=True)
    # Texts inside the calibration set stay inside its ranges: no clipping, no wrapping.
    texts = [*TEXTS, *CALIBRATION[:5]]
    floats = np.vstack([floats, calibration[:5]])
    want = quantize_embeddings(floats, precision=fmt, calibration_embeddings=calibration)
    tei = np.array(post(server, "/embed", {"inputs": texts, "encoding_format": fmt}))
    oai = post(server, "/v1/embeddings", {"input": texts, "encoding_format": fmt})
    oai = np.array([d["embedding"] for d in oai["data"]])
    for got in (tei, oai):
        assert got.shape == want.shape
        if fmt in ("binary", "ubinary"):
            np.testing.assert_array_equal(got, want)
        else:  # a value on a step boundary may round either way in float32
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
            assert (got != want).mean() < 0.01
    lo, hi = {"int8": (-128, 127), "uint8": (0, 255)}.get(fmt, (-128, 255))
    assert tei.min() >= lo and tei.max() <= hi


def test_matryoshka_sizes_have_their_own_ranges(server: Server) -> None:
    with server.client() as c:
        info = c.get("/info").json()
    nomic = next(m for m in info["models"] if m["name"] == "tiny-nomic")
    ranges = nomic["int8_calibration"]["ranges"]
    assert sorted(ranges, key=int) == ["8", "16", "32"]
    assert nomic["int8_calibration"]["texts"] == len(CALIBRATION)
    assert all(len(r["min"]) == int(size) for size, r in ranges.items())
    body = {"inputs": TEXTS, "model": "tiny-nomic", "dimensions": 16}
    v = np.array(post(server, "/embed", {**body, "encoding_format": "uint8"}))
    floats = np.array(post(server, "/embed", body))
    lo, hi = np.array(ranges["16"]["min"]), np.array(ranges["16"]["max"])
    want = np.clip(np.floor((floats - lo) / ((hi - lo) / 255)), 0, 255)
    assert v.shape == (3, 16) and np.abs(v - want).max() <= 1
    b = np.array(post(server, "/embed", {"inputs": TEXTS, "encoding_format": "binary"}))
    assert b.shape == (3, 384 // 8)


def test_openai_client_and_bad_requests(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    res = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS, encoding_format="ubinary")  # type: ignore[arg-type]
    assert [len(d.embedding) for d in res.data] == [48, 48, 48]
    assert all(0 <= x <= 255 and float(x).is_integer() for d in res.data for x in d.embedding)
    with server.client() as c:
        r = c.post("/embed", json={"inputs": "a", "normalize": False, "encoding_format": "int8"})
        assert r.status_code == 422 and "normalized" in r.json()["error"]
        r = c.post("/embed", json={"inputs": "a", "encoding_format": "int4"})
        assert r.status_code == 422 and "encoding_format" in r.json()["error"]
        r = c.post("/v1/embeddings", json={"input": "a", "encoding_format": "int4"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "encoding_format"
        # Binary needs no calibration: raw vectors quantize by sign.
        r = c.post("/embed", json={"inputs": "a", "normalize": False, "encoding_format": "binary"})
        assert r.status_code == 200
