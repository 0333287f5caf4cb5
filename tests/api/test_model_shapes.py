"""BGE-shaped and Nomic-shaped behaviour checked against the model cards' formulas,
computed with plain transformers (no sentence-transformers in the reference path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from tests.support import Server, cosine
from tests.support.models import BGE_QUERY

QUERIES = ["how do vaccines work", "best hiking trails near Zurich"]
PASSAGES = ["Vaccines train the immune system to recognise a pathogen.", "The Uetliberg trail."]


def hidden_states(path: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    return out, enc["attention_mask"]


def post(server: Server, body: dict) -> np.ndarray:
    with server.client() as c:
        r = c.post("/embed", json=body)
    assert r.status_code == 200, r.text
    return np.array(r.json())


def test_bge_card_cls_pooling_with_query_instruction(server: Server, model_dir: Path) -> None:
    # BGE card: queries get the instruction, passages none; CLS vector, L2-normalized.
    h, _ = hidden_states(model_dir / "tiny-bge", [BGE_QUERY + q for q in QUERIES])
    expected_q = F.normalize(h[:, 0], p=2, dim=1).numpy()
    h, _ = hidden_states(model_dir / "tiny-bge", PASSAGES)
    expected_p = F.normalize(h[:, 0], p=2, dim=1).numpy()
    got_q = post(server, {"inputs": QUERIES, "model": "tiny-bge", "prompt_name": "query"})
    got_p = post(server, {"inputs": PASSAGES, "model": "tiny-bge"})
    for got, exp in ((got_q, expected_q), (got_p, expected_p)):
        for a, b in zip(got, exp, strict=True):
            assert cosine(a, b) >= 0.9999


def test_nomic_card_matryoshka_recipe(server: Server, model_dir: Path) -> None:
    # Nomic v1.5 card: mean pooling, layer_norm, truncate to the Matryoshka dim, normalize.
    texts = ["search_query: " + q for q in QUERIES]
    h, mask = hidden_states(model_dir / "tiny-nomic", texts)
    m = mask.unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    # Truncated sizes only: the full size (32) equals no `dimensions` (no layer norm), so
    # clients that ask for it and clients that do not get the same vectors.
    for dim in (16, 8):
        expected = F.normalize(F.layer_norm(pooled, (pooled.shape[1],))[:, :dim], dim=1).numpy()
        got = post(
            server,
            {
                "inputs": QUERIES,
                "model": "tiny-nomic",
                "prompt_name": "search_query",
                "dimensions": dim,
            },
        )
        assert got.shape == (2, dim)
        for a, b in zip(got, expected, strict=True):
            assert cosine(a, b) >= 0.9999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
