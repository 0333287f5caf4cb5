"""The torch backend's own BERT-family encoder (backends/bert.py) against transformers and
sentence-transformers, and the fallback to sentence-transformers for everything else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embedsvc.backends import bert
from embedsvc.backends.base import PaddedBatch
from embedsvc.backends.torch_backend import load_torch_model
from embedsvc.errors import ConfigError
from tests.support import spec
from tests.support.models import MINILM_PATH

TEXTS = [
    "hello",
    "A much longer sentence about the capital of France, Paris, and the Seine.",
    "Ünïcode, 数字 and punctuation!",
]


def forward(folder: Path, texts: list[str], **kw: object) -> np.ndarray:
    """Vectors before normalization, as the engine receives them."""
    loaded = load_torch_model(spec(folder.name, **kw), folder)
    enc = [loaded.tokenizer.encode(t) for t in texts]
    width = max(len(e.ids) for e in enc)
    ids = np.full((len(enc), width), loaded.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(enc), width), dtype=np.int64)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return loaded.backend.forward(PaddedBatch(ids, mask)).pooled


def reference(folder: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    modules = [m for m in st if type(m).__name__ != "Normalize"]
    features = st.tokenize(texts)
    with torch.no_grad():
        for m in modules:
            features = m(features)
    return features["sentence_embedding"].numpy()


# Over bert.SHORT_ATTENTION tokens: a batch with it takes the fused attention kernel.
LONG = " ".join(["The river flows past the old mill and the quiet town."] * 6)


@pytest.mark.parametrize("name", ["minilm", "tiny-bge", "tiny-nomic", "tiny-bigvocab"])
def test_own_encoder_equals_sentence_transformers(name: str, model_dir: Path) -> None:
    folder = MINILM_PATH if name == "minilm" else model_dir / name
    p = bert.plan(folder)
    assert p is not None
    batches = [TEXTS]
    if (p.max_seq_length or 512) > 80:  # (tiny-bge's 64 would truncate LONG)
        batches.append([*TEXTS, LONG])  # a batch past SHORT_ATTENTION
    for texts in batches:
        got = forward(folder, texts)
        np.testing.assert_allclose(got, reference(folder, texts), atol=2e-5, rtol=1e-4)


def test_a_forward_pass_is_one_traced_call(model_dir: Path) -> None:
    """Encoder and pooling are one TorchScript module that returns the vectors: each
    torch call from Python releases the GIL and must wait to take it back from the busy
    event loop, so the pass makes one (see TorchBackend.forward)."""
    loaded = load_torch_model(spec("tiny-bge"), model_dir / "tiny-bge")
    encoder = loaded.backend._encoder  # type: ignore[attr-defined]
    assert isinstance(encoder, torch.jit.ScriptModule)
    with torch.inference_mode():
        out = encoder(torch.tensor([[2, 40, 41, 3]]), torch.ones(1, 4, dtype=torch.long))
    assert out.shape == (1, loaded.backend.dimension) and out.dtype == torch.float32


def test_packed_encoder_equals_padded(model_dir: Path) -> None:
    """On a CPU the encoder runs its dense layers on real tokens only: the same vectors as
    computing every padded position."""
    p = bert.plan(model_dir / "tiny-nomic")
    assert p is not None
    encoder = bert.build(p, "cpu", "float32")
    assert encoder.packed
    for width in (11, bert.SHORT_ATTENTION + 20):  # both attention kernels
        ids = torch.randint(5, 90, (4, width))
        mask = torch.ones(4, width, dtype=torch.long)
        for row, n in enumerate((width, 3, 7, 1)):
            mask[row, n:] = 0
        with torch.inference_mode():
            encoder.packed = True
            packed = bert.pool(encoder(ids, mask), mask, "mean")
            encoder.packed = False
            padded = bert.pool(encoder(ids, mask), mask, "mean")
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_xlm_roberta_positions_and_padding(tmp_path: Path) -> None:
    """XLM-R counts positions from padding_idx + 1 and pads with id 1: compared with
    transformers' XLMRobertaModel on a right-padded batch."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(4)
    config = XLMRobertaConfig(
        vocab_size=500,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=1,
        initializer_range=0.5,
        pad_token_id=1,
    )
    model = XLMRobertaModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    p = bert.Plan(cfg, sorted(tmp_path.glob("*.safetensors")), "mean", 64, 32)
    ours = bert.build(p, "cpu", "float32")
    ids = torch.tensor([[0, 57, 99, 431, 2], [0, 8, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)


def test_other_models_load_with_sentence_transformers(model_dir: Path, tmp_path: Path) -> None:
    """A Dense layer after pooling (or custom code, or options the encoder does not know)
    is outside the plan: the model loads through sentence-transformers, vectors unchanged."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense

    st = SentenceTransformer(str(model_dir / "tiny-bge"), device="cpu", local_files_only=True)
    torch.manual_seed(5)
    dense = SentenceTransformer(modules=[*st, Dense(32, 16)], device="cpu")
    folder = tmp_path / "with-dense"
    dense.save(str(folder), safe_serialization=True)
    assert bert.plan(folder) is None
    got = forward(folder, TEXTS)
    assert got.shape == (3, 16)
    np.testing.assert_allclose(got, reference(folder, TEXTS), atol=2e-5, rtol=1e-4)
    # do_lower_case: nothing to do when the tokenizer lower-cases anyway (BGE); on a cased
    # tokenizer sentence-transformers lower-cases the text itself, so it loads the model.
    lower = tmp_path / "lower"
    shutil.copytree(model_dir / "tiny-bge", lower)
    config = {"max_seq_length": 64, "do_lower_case": True}
    (lower / "sentence_bert_config.json").write_text(json.dumps(config))
    assert bert.plan(lower) is not None
    tokenizer = json.loads((lower / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    (lower / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert bert.plan(lower) is None


def test_a_model_the_tracer_cannot_follow_runs_eagerly_with_a_warning(caplog: Any) -> None:
    """A transformer whose code branches on its input's length traces to one branch: the
    probes catch it, and one that cannot be traced at all, and each runs eagerly with a
    WARNING (not an info line nobody reads)."""
    import torch

    from embedsvc.backends.torch_common import trace_states

    class Branchy(torch.nn.Module):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = (ids * mask).float().unsqueeze(-1).repeat(1, 1, 4)
            return x * 2 if ids.shape[1] > 8 else x  # a trace keeps the branch it saw

    class Untraceable(torch.nn.Module):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
            return {"states": [ids.tolist()]}  # no tensor out

    for module, said in ((Branchy(), "differs from the eager one"), (Untraceable(), "cannot")):
        caplog.clear()
        with caplog.at_level("INFO", logger="embedsvc"):
            assert trace_states(module.eval(), "cpu") is None
        [record] = [r for r in caplog.records if "running eagerly" in r.getMessage()]
        assert record.levelname == "WARNING" and said in record.getMessage()


def test_a_pylate_colbert_folder_is_refused_not_served_approximately(
    model_dir: Path, tmp_path: Path
) -> None:
    """PyLate saves a ColBERT model as a Transformer and its own Dense projection (plus
    query/document markers in its configuration); sentence-transformers would load the
    backbone alone and give vectors the model never produces. Refused at load, naming the
    module and the task that serves it."""
    folder = tmp_path / "colbert"
    shutil.copytree(model_dir / "tiny-bge", folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match=r"pylate\.models\.Dense\.Dense.*task: multivector"):
        load_torch_model(spec("colbert"), folder)
