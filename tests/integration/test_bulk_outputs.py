"""`embedsvc embed --outputs`: the sparse and multi-vector columns beside (or instead of) the
dense one, from one pass per batch: a BGE-M3-shaped model's three outputs equal /encode's,
a ColBERT model's token vectors equal sentence-transformers' MultiVectorEncoder, a SPLADE
model's weights equal /embed_sparse; the column types; and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedsvc.cli import main
from embedsvc.registry import load_registry
from tests.support import Server, cosine, run_server
from tests.support.models import build_tiny_colbert, build_tiny_m3

WORDS = "the of and to in is was for on that with as by at from river city museum , .".split()
REV = "0" * 40


@pytest.fixture(scope="module")
def models(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bulk-outputs")
    m3 = build_tiny_m3(root / "tiny-m3", model_dir / "tiny-bge")
    colbert = build_tiny_colbert(root / "tiny-colbert", seed=40)
    entries = [
        {"name": "tiny-m3", "hf_id": "t/m3", "revision": REV, "local_dir": str(m3),
         "pooling": "cls", "max_seq_length": 64, "lexical_weights": True, "multivector": True},
        {"name": "tiny-colbert", "hf_id": "t/c", "revision": REV, "local_dir": str(colbert),
         "task": "multivector"},
        {"name": "tiny-splade", "hf_id": "t/s", "revision": REV,
         "local_dir": str(model_dir / "tiny-splade"), "task": "sparse"},
        {"name": "tiny-bge", "hf_id": "t/b", "revision": REV,
         "local_dir": str(model_dir / "tiny-bge"), "pooling": "cls"},
    ]  # fmt: skip
    (root / "models.yaml").write_text(json.dumps({"models": entries}))
    return root


@pytest.fixture(scope="module")
def m3_server(models: Path) -> Iterator[Server]:
    with run_server(load_registry(models / "models.yaml"), ["tiny-m3", "tiny-splade"]) as s:
        yield s


def rows(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(5)
    return [
        {"id": i, "text": " ".join(rng.choice(WORDS, int(rng.integers(2, 30))))} for i in range(n)
    ]


def run_job(models: Path, tmp_path: Path, data: list[dict[str, Any]], *args: str) -> pa.Table:
    tmp_path.mkdir(exist_ok=True)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in data))
    out = tmp_path / "out"
    code = main(
        ["embed", str(src), "--output", str(out), *args,
         "--models-file", str(models / "models.yaml"), "--log-level", "warning"]
    )  # fmt: skip
    assert code == 0
    return pq.read_table(out).sort_by("id")


def test_three_outputs_equal_encode(models: Path, m3_server: Server, tmp_path: Path) -> None:
    data = rows(30)
    args = ["--model", "tiny-m3", "--outputs", "dense,sparse,multivector", "--dtype", "float16"]
    table = run_job(models, tmp_path, data, *args)
    schema = table.schema
    assert schema.names == ["id", "embedding", "sparse", "multivector", "n_tokens"]
    assert schema.field("embedding").type == pa.list_(pa.float16(), 32)
    entry = pa.struct([("index", pa.int32()), ("value", pa.float32())])
    assert schema.field("sparse").type == pa.list_(entry)
    assert schema.field("multivector").type == pa.list_(pa.list_(pa.float16(), 32))
    with m3_server.client() as c:
        body = {"inputs": [r["text"] for r in data], "outputs": ["dense", "sparse", "multivector"]}
        want = c.post("/encode", json=body | {"model": "tiny-m3"}).json()
    for k, item in enumerate(want):
        assert cosine(table.column("embedding")[k].as_py(), item["dense"]) > 0.9999
        got = {e["index"]: e["value"] for e in table.column("sparse")[k].as_py()}
        assert got.keys() == {e["index"] for e in item["sparse"]}
        for e in item["sparse"]:
            assert abs(got[e["index"]] - e["value"]) <= 1e-5 * max(1.0, abs(e["value"]))
        vectors = np.array(table.column("multivector")[k].as_py(), np.float32)
        np.testing.assert_allclose(vectors, np.array(item["multivector"]), atol=2e-3)


def test_colbert_and_splade_columns(models: Path, m3_server: Server, tmp_path: Path) -> None:
    """A ColBERT model's documents (its skiplist applied) and a SPLADE model's weights,
    each alone in its shard."""
    from sentence_transformers import MultiVectorEncoder

    data = rows(20)
    texts = [r["text"] for r in data]
    table = run_job(
        models,
        tmp_path / "c",
        data,
        *("--model", "tiny-colbert", "--outputs", "multivector", "--prompt-name", "document"),
    )
    assert table.schema.names == ["id", "multivector", "n_tokens"]
    mve = MultiVectorEncoder(str(models / "tiny-colbert"), device="cpu", local_files_only=True)
    want = mve.encode_document(texts, convert_to_numpy=True)
    for k, w in enumerate(want):
        got = np.array(table.column("multivector")[k].as_py(), np.float32)
        assert got.shape == w.shape
        np.testing.assert_allclose(got, w, atol=1e-5)
    splade = run_job(models, tmp_path / "s", data, "--model", "tiny-splade", "--outputs", "sparse")
    with m3_server.client() as c:
        weights = c.post("/embed_sparse", json={"inputs": texts, "model": "tiny-splade"}).json()
    for k, w in enumerate(weights):
        got = {e["index"]: e["value"] for e in splade.column("sparse")[k].as_py()}
        # Batches of other compositions: float32 noise of the order of 1e-5.
        assert got == pytest.approx({e["index"]: e["value"] for e in w}, rel=1e-4, abs=5e-5)


def test_outputs_a_model_has_not_are_refused(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "text": "a"}\n')
    common = ["embed", str(src), "--output", str(tmp_path / "o"), "--models-file"]
    common += [str(models / "models.yaml"), "--log-level", "warning"]
    for args, words in (
        (["--model", "tiny-bge", "--outputs", "dense,sparse"], "cannot give --outputs"),
        (["--model", "tiny-colbert", "--outputs", "dense"], "it gives multivector"),
        (["--model", "tiny-m3", "--outputs", "dense,colbert"], "--outputs must name"),
    ):
        assert main(common + args) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "o" / "part-00000.parquet").exists()


def test_ray_run_writes_the_same_columns(models: Path, tmp_path: Path) -> None:
    """`--ray` (a local cluster, two actors): the same three columns as one machine's run."""
    pytest.importorskip("ray")
    data = rows(60)
    args = ["--model", "tiny-m3", "--outputs", "dense,sparse,multivector", "--shard-rows", "25"]
    one = run_job(models, tmp_path / "one", data, *args)
    src = tmp_path / "one" / "in.jsonl"
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "embedsvc", "embed", str(src), "--output", str(out), *args,
           "--models-file", str(models / "models.yaml"), "--ray", "--num-actors", "2"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ADDRESS="", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ray = pq.read_table(out).sort_by("id")
    assert ray.schema == one.schema
    assert ray.column("id").to_pylist() == one.column("id").to_pylist()
    assert ray.column("n_tokens").to_pylist() == one.column("n_tokens").to_pylist()
    np.testing.assert_allclose(
        np.array(ray.column("embedding").to_pylist()),
        np.array(one.column("embedding").to_pylist()),
        atol=1e-5,
    )
    for k in range(len(data)):
        got = {e["index"]: e["value"] for e in ray.column("sparse")[k].as_py()}
        want = {e["index"]: e["value"] for e in one.column("sparse")[k].as_py()}
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        a = np.array(ray.column("multivector")[k].as_py())
        np.testing.assert_allclose(a, np.array(one.column("multivector")[k].as_py()), atol=1e-4)
