"""`embedsvc embed`: every input format, resume after SIGKILL, bad rows, manifest
mismatch, OpenAI batch files, readers of the output, and equality with /embed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedsvc.cli import main
from tests.support import Server, cosine

WORDS = "the of and to in is was for on that with as by at from river city museum".split()


def corpus(n: int, seed: int = 0, longest: int = 40) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        {"id": f"doc-{i}", "text": " ".join(rng.choice(WORDS, int(rng.integers(3, longest))))}
        for i in range(n)
    ]


def embed(model_dir: Path, *args: str) -> int:
    return main(
        ["embed", *args, "--models-file", str(model_dir / "models.yaml"), "--log-level", "warning"]
    )


def read_output(out: Path) -> pa.Table:
    return pq.read_table(out).sort_by("id")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_formats_give_the_same_vectors(model_dir: Path, tmp_path: Path) -> None:
    import datasets

    rows = corpus(300)
    table = pa.Table.from_pylist(rows)
    inputs: dict[str, tuple[Path, list[str]]] = {}
    inputs["jsonl"] = (write_jsonl(tmp_path / "in.jsonl", rows), [])
    pq.write_table(table, tmp_path / "in.parquet")
    inputs["parquet"] = (tmp_path / "in.parquet", [])
    table.to_pandas().to_csv(tmp_path / "in.csv", index=False)
    inputs["csv"] = (tmp_path / "in.csv", [])
    with (
        pa.OSFile(str(tmp_path / "in.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as w,
    ):
        w.write_table(table)
    inputs["arrow"] = (tmp_path / "in.arrow", [])
    folder = tmp_path / "folder"  # a folder of Parquet files, read in name order
    folder.mkdir()
    pq.write_table(table.slice(0, 120), folder / "a.parquet")
    pq.write_table(table.slice(120), folder / "b.parquet")
    inputs["parquet folder"] = (folder, [])
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    inputs["save_to_disk"] = (tmp_path / "saved", [])
    hub_like = tmp_path / "hub-like"  # a dataset repository's layout, read with datasets
    (hub_like / "data").mkdir(parents=True)
    pq.write_table(table, hub_like / "data" / "train-00000-of-00001.parquet")
    inputs["hf folder"] = (hub_like, ["--format", "hf", "--split", "train"])
    inputs["hf streaming"] = (hub_like, ["--format", "hf", "--split", "train", "--streaming"])
    outputs = {}
    for name, (path, extra) in inputs.items():
        out = tmp_path / ("out-" + name.replace(" ", "-"))
        assert (
            embed(
                model_dir,
                str(path),
                "--output",
                str(out),
                "--model",
                "tiny-bge",
                "--shard-rows",
                "128",
                *extra,
            )
            == 0
        ), name
        outputs[name] = read_output(out)
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["complete"] and manifest["summary"]["rows"] == 300, name
        assert [s["first_row"] for s in manifest["shards"]] == [0, 128, 256], name
    first = outputs["jsonl"]
    assert first.column("id").to_pylist() == sorted(r["id"] for r in rows)
    assert first.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    for name, t in outputs.items():
        assert t.column("id").to_pylist() == first.column("id").to_pylist(), name
        a = np.array(t.column("embedding").to_pylist())
        b = np.array(first.column("embedding").to_pylist())
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        assert t.column("n_tokens").to_pylist() == first.column("n_tokens").to_pylist()


def test_vectors_equal_embed_route(server: Server, model_dir: Path, tmp_path: Path) -> None:
    """The same engine as the server: prompt, Matryoshka size, normalization, float16."""
    rows = corpus(40, seed=3)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = ["--model", "tiny-nomic", "--input-type", "query", "--dimensions", "16"]
    assert embed(model_dir, str(src), "--output", str(out), *args, "--dtype", "float16") == 0
    got = read_output(out)
    ids = got.column("id").to_pylist()
    by_id = dict(zip(ids, got.column("embedding").to_pylist(), strict=True))
    tokens = dict(zip(ids, got.column("n_tokens").to_pylist(), strict=True))
    with server.client() as c:
        r = c.post(
            "/embed",
            json={
                "inputs": [x["text"] for x in rows],
                "model": "tiny-nomic",
                "prompt_name": "search_query",
                "dimensions": 16,
            },
        )
        toks = c.post(
            "/tokenize",
            json={
                "inputs": [x["text"] for x in rows],
                "model": "tiny-nomic",
                "prompt_name": "search_query",
            },
        ).json()
    assert r.status_code == 200
    for row, vec, tok in zip(rows, r.json(), toks, strict=True):
        assert cosine(by_id[row["id"]], vec) > 0.9999  # float16 storage
        assert tokens[row["id"]] == len(tok)
    assert got.schema.field("embedding").type == pa.list_(pa.float16(), 16)
    manifest = json.loads((out / "_manifest.json").read_text())["job"]
    assert manifest["prompt"] == "search_query: " and manifest["dimensions"] == 16


def test_bad_rows_are_listed_and_the_job_goes_on(model_dir: Path, tmp_path: Path) -> None:
    rows: list[Any] = corpus(20)
    rows[3]["text"] = None
    rows[5]["text"] = ""
    rows[7]["text"] = 42
    del rows[9]["text"]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    with open(src, "a") as f:
        f.write("{not json\n")
    out = tmp_path / "out"
    assert embed(model_dir, str(src), "--output", str(out), "--model", "tiny-bge") == 1
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["error"]) for e in errors[:4]] == [
        (3, "text is null"), (5, "text is empty"), (7, "text is int, not text"),
        (9, "the row has no 'text'"),
    ]  # fmt: skip
    assert errors[4]["row"] == 20 and "not a JSON object" in errors[4]["error"]
    assert read_output(out).num_rows == 16
    summary = json.loads((out / "_manifest.json").read_text())["summary"]
    assert summary["rows"] == 16 and summary["failed"] == 5
    # Over-long rows without truncation fail alone; --on-error fail stops at the first.
    long_rows = corpus(10)
    long_rows[4]["text"] = "word " * 200
    src = write_jsonl(tmp_path / "long.jsonl", long_rows)
    out = tmp_path / "out-long"
    assert (
        embed(model_dir, str(src), "--output", str(out), "--model", "tiny-bge", "--no-truncate")
        == 1
    )
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["doc-4"] and "64" in errors[0]["error"]
    assert read_output(out).num_rows == 9
    assert (
        embed(
            model_dir,
            str(src),
            "--output",
            str(tmp_path / "stop"),
            "--model",
            "tiny-bge",
            "--no-truncate",
            "--on-error",
            "fail",
        )
        == 3
    )


def test_rerun_continues_or_refuses_another_job(model_dir: Path, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", corpus(50))
    out = tmp_path / "out"
    args = [str(src), "--output", str(out), "--model", "tiny-bge"]
    assert embed(model_dir, *args) == 0
    assert embed(model_dir, *args) == 0  # complete: nothing to do
    for extra in (["--input-type", "query"], ["--model", "tiny-nomic"], ["--dtype", "float16"]):
        assert embed(model_dir, *args, *extra) == 2  # another job: refused
    write_jsonl(src, corpus(51))  # the input changed
    assert embed(model_dir, *args) == 2
    assert embed(model_dir, *args, "--overwrite") == 0
    assert read_output(out).num_rows == 51


def test_mismatch_message_names_the_difference(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", corpus(10))
    out = tmp_path / "out"
    assert embed(model_dir, str(src), "--output", str(out), "--model", "tiny-bge") == 0
    capsys.readouterr()
    assert (
        embed(
            model_dir,
            str(src),
            "--output",
            str(out),
            "--model",
            "tiny-bge",
            "--dimensions",
            "32",
            "--input-type",
            "query",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "prompt: was ''" in err and "Represent this sentence" in err and "--overwrite" in err


def test_sigkill_mid_run_then_rerun_gives_every_row_once(model_dir: Path, tmp_path: Path) -> None:
    rows = corpus(1200, seed=7)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "embedsvc",
        "embed",
        str(src),
        "--output",
        str(out),
        "--model",
        "all-minilm-l6-v2",
        "--shard-rows",
        "100",
        "--models-file",
        str(model_dir / "models.yaml"),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "_manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(json.loads(manifest.read_text())["shards"])
    assert 2 <= done_before < 12
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    final = json.loads(manifest.read_text())
    assert final["complete"] and len(final["shards"]) == 12
    assert [s["index"] for s in final["shards"]] == list(range(12))
    table = read_output(out)
    assert table.column("id").to_pylist() == sorted(r["id"] for r in rows)  # each row once
    assert not list(out.glob("*.tmp"))
    # The same vectors as a run that was never interrupted.
    whole = tmp_path / "whole"
    assert (
        embed(
            model_dir,
            str(src),
            "--output",
            str(whole),
            "--model",
            "all-minilm-l6-v2",
            "--shard-rows",
            "100",
        )
        == 0
    )
    a = np.array(table.column("embedding").to_pylist())
    b = np.array(read_output(whole).column("embedding").to_pylist())
    np.testing.assert_allclose(a, b, atol=1e-5)
    import hashlib

    for s in final["shards"]:
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]


def test_output_reads_with_common_tools(model_dir: Path, tmp_path: Path) -> None:
    import datasets
    import pandas as pd

    rows = corpus(30)
    rows[2]["text"] = None  # an error row, so _errors.jsonl is there too
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert embed(model_dir, str(src), "--output", str(out), "--model", "tiny-bge") == 1
    assert pq.read_table(out).num_rows == 29
    assert len(pd.read_parquet(out)) == 29
    assert datasets.load_dataset(str(out), split="train").num_rows == 29


def test_openai_batch_file(server: Server, model_dir: Path, tmp_path: Path) -> None:
    """A file made for OpenAI's Batch API (its documented line layout) runs unchanged."""
    lines = [
        {"custom_id": "request-1", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "tiny-bge", "input": "The food was delicious."}},
        {"custom_id": "request-2", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "tiny-e5", "input": ["a", "b"], "encoding_format": "base64"}},
        {"custom_id": "request-3", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "no-such-model", "input": "x"}},
        {"custom_id": "request-4", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "tiny-bge", "input": ""}},
        {"custom_id": "request-5", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny-bge"}},
    ]  # fmt: skip
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    out = tmp_path / "out"
    assert embed(model_dir, str(src), "--format", "openai-batch", "--output", str(out)) == 1
    ok = [json.loads(x) for x in (out / "output.jsonl").read_text().splitlines()]
    bad = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in ok] == ["request-1", "request-2"]
    assert [x["custom_id"] for x in bad] == ["request-3", "request-4", "request-5"]
    for x in ok:
        assert x["id"].startswith("batch_req_") and x["error"] is None
        assert x["response"]["status_code"] == 200
        assert x["response"]["request_id"] == x["id"]
    with server.client() as c:
        want = c.post("/v1/embeddings", json=lines[0]["body"]).json()
        want2 = c.post("/v1/embeddings", json=lines[1]["body"]).json()
    body = ok[0]["response"]["body"]
    assert body["model"] == "tiny-bge" and body["usage"] == want["usage"]
    assert cosine(body["data"][0]["embedding"], want["data"][0]["embedding"]) > 0.99999
    import base64

    def decode(s: str) -> np.ndarray:
        return np.frombuffer(base64.b64decode(s), dtype="<f4")

    for got, exp in zip(ok[1]["response"]["body"]["data"], want2["data"], strict=True):
        assert cosine(decode(got["embedding"]), decode(exp["embedding"])) > 0.99999
    # Errors carry the server's own status and body.
    assert bad[0]["response"]["status_code"] == 404
    assert bad[0]["response"]["body"]["error"]["code"] == "model_not_found"
    assert bad[1]["response"]["status_code"] == 400
    assert bad[1]["response"]["body"] == c_error(server, lines[3]["body"])
    assert bad[2]["response"] is None and "url" in bad[2]["error"]["message"]


def test_overwrite_removes_only_job_files_and_never_the_input(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`embed corpus.jsonl --output . --overwrite` used to delete the corpus (every
    *.jsonl in the folder went): an output folder that holds the input is refused, and
    --overwrite removes only the files a job writes."""
    folder = tmp_path / "data"
    folder.mkdir()
    src = write_jsonl(folder / "corpus.jsonl", corpus(20))
    for out in (folder, tmp_path):  # holds the input, directly or below
        capsys.readouterr()
        assert (
            embed(model_dir, str(src), "--output", str(out), "--model", "tiny-bge", "--overwrite")
            == 2
        )
        assert "holds the input" in capsys.readouterr().err and src.is_file()
    inside = folder / "vectors"
    assert embed(model_dir, str(folder), "--output", str(inside), "--model", "tiny-bge") == 2
    assert "inside the input folder" in capsys.readouterr().err
    out = tmp_path / "out"
    args = [str(src), "--output", str(out), "--model", "tiny-bge"]
    assert embed(model_dir, *args) == 0
    keep = [out / "notes.jsonl", out / "README.md", out / "other.parquet"]
    for f in keep:
        f.write_text("mine")
    (out / "part-00007.parquet.tmp").write_bytes(b"left by a killed run")
    assert embed(model_dir, *args, "--overwrite") == 0
    assert all(f.read_text() == "mine" for f in keep)
    assert not (out / "part-00007.parquet.tmp").exists()
    assert read_output_files(out).num_rows == 20


def read_output_files(out: Path) -> pa.Table:
    """The job's shards (the folder may hold other files of its owner's)."""
    return pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("part-*.parquet")))


def test_resume_redoes_a_shard_that_is_missing_or_changed(model_dir: Path, tmp_path: Path) -> None:
    """Resume trusted the manifest: a deleted or truncated shard went unnoticed. Every
    committed shard is checked (size, sha256); from the first bad one on, shards and their
    error rows are redone, and the output is what an untouched run gives."""
    rows = corpus(40, seed=3)
    rows[25]["text"] = None  # an error row in shard 2, one in shard 3
    rows[33]["text"] = 12
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    whole, out = tmp_path / "whole", tmp_path / "out"
    for folder in (whole, out):
        assert (
            embed(
                model_dir,
                str(src),
                "--output",
                str(folder),
                "--model",
                "tiny-bge",
                "--shard-rows",
                "10",
            )
            == 1
        )
    want = read_output(whole)
    errors = (whole / "_errors.jsonl").read_text()
    for damage in ("truncate", "delete", "flip"):
        shard = out / "part-00001.parquet"
        if damage == "truncate":
            shard.write_bytes(shard.read_bytes()[:-100])
        elif damage == "delete":
            shard.unlink()
        else:
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
        assert (
            embed(
                model_dir,
                str(src),
                "--output",
                str(out),
                "--model",
                "tiny-bge",
                "--shard-rows",
                "10",
            )
            == 1
        )
        got = read_output(out)  # the same rows; vectors within batch-shape rounding
        assert got.column("id").equals(want.column("id")), damage
        assert got.column("n_tokens").equals(want.column("n_tokens")), damage
        np.testing.assert_allclose(
            np.array(got.column("embedding").to_pylist()),
            np.array(want.column("embedding").to_pylist()),
            atol=1e-5,
        )
        assert (out / "_errors.jsonl").read_text() == errors  # each error row once
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1, 2, 3]


def test_openai_batch_repeated_custom_ids_are_error_lines(model_dir: Path, tmp_path: Path) -> None:
    line = {"method": "POST", "url": "/v1/embeddings", "body": {"model": "tiny-bge", "input": "x"}}
    ids = ["a", "b", "a", "c", "b"]
    src = write_jsonl(tmp_path / "batch.jsonl", [{"custom_id": i, **line} for i in ids])
    out = tmp_path / "out"
    assert embed(model_dir, str(src), "--format", "openai-batch", "--output", str(out)) == 1
    ok = [json.loads(x) for x in (out / "output.jsonl").read_text().splitlines()]
    bad = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in ok] == ["a", "b", "c"]
    assert [(x["custom_id"], x["error"]["code"]) for x in bad] == [
        ("a", "duplicate_custom_id"),
        ("b", "duplicate_custom_id"),
    ]
    assert bad[0]["error"]["message"].startswith("line 3: custom_id 'a' is used by an earlier")


def c_error(server: Server, body: dict[str, Any]) -> Any:
    with server.client() as c:
        return c.post("/v1/embeddings", json=body).json()


def test_hub_dataset_needs_a_pinned_revision(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert embed(model_dir, "someone/corpus", "--output", str(tmp_path / "o")) == 2
    assert "--revision" in capsys.readouterr().err


def test_ray_run_equals_the_single_machine_run(model_dir: Path, tmp_path: Path) -> None:
    """`--ray` on a local Ray cluster (2 CPUs, one actor each), killed after a shard and
    rerun: the same shards, manifest and vectors as a run on one machine."""
    pytest.importorskip("ray")
    rows: list[Any] = corpus(700, seed=11)
    rows[10]["text"] = None
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--model", "tiny-bge", "--shard-rows", "200"]
    assert embed(model_dir, str(src), "--output", str(tmp_path / "one"), *args) == 1
    out = tmp_path / "ray"
    models = str(model_dir / "models.yaml")
    cmd = [
        sys.executable,
        "-m",
        "embedsvc",
        "embed",
        str(src),
        "--output",
        str(out),
        *args,
        "--models-file",
        models,
        "--ray",
        "--num-actors",
        "2",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ADDRESS="", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "_manifest.json").read_text())
    ray = json.loads((out / "_manifest.json").read_text())
    assert ray["job"] == one["job"]
    strip = ("sha256", "bytes")
    assert [{k: v for k, v in s.items() if k not in strip} for s in ray["shards"]] == [
        {k: v for k, v in s.items() if k not in strip} for s in one["shards"]
    ]
    assert (out / "_errors.jsonl").read_text() == (tmp_path / "one" / "_errors.jsonl").read_text()
    a, b = read_output(out), read_output(tmp_path / "one")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    np.testing.assert_allclose(
        np.array(a.column("embedding").to_pylist()),
        np.array(b.column("embedding").to_pylist()),
        atol=1e-5,
    )
    assert a.column("n_tokens").to_pylist() == b.column("n_tokens").to_pylist()
    # Resume on Ray: drop the last two shards from the manifest, as a kill would leave it.
    ray["shards"] = ray["shards"][:2]
    ray["complete"] = False
    ray["errors_bytes"] = len((out / "_errors.jsonl").read_bytes())
    (out / "_manifest.json").write_text(json.dumps(ray))
    (out / "part-00003.parquet").unlink()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    again = read_output(out)
    assert again.column("id").to_pylist() == b.column("id").to_pylist()
    final = json.loads((out / "_manifest.json").read_text())
    assert [s["index"] for s in final["shards"]] == [0, 1, 2, 3]


def _embed_cmd(model_dir: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "embedsvc", "embed", str(src), "--output", str(out),
        "--model", "all-minilm-l6-v2", "--models-file", str(model_dir / "models.yaml"), *extra,
    ]  # fmt: skip


def _committed_rows(manifest: Path) -> int:
    if not manifest.exists():
        return 0
    return sum(s["input_rows"] for s in json.loads(manifest.read_text())["shards"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_job_cleanly_and_it_resumes(
    model_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """With shards far larger than the job (--shard-rows 100000), the shard in progress
    is still committed every --commit-seconds; SIGINT (Ctrl-C) or SIGTERM stops the job
    with 128 + the signal's number, committing what was embedded, one line saying how to
    resume and no traceback; the same command then finishes with every row once."""
    # More rows than the job keeps in flight (bulk/spec.py: CHUNK * WINDOW), so that chunks
    # finish while others are still read; short ones, so that embedding them is quick.
    rows = corpus(5000, seed=11, longest=8)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    cmd = _embed_cmd(model_dir, src, out, "--commit-seconds", "0.2")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "_manifest.json"
    deadline = time.monotonic() + 180
    while _committed_rows(manifest) == 0:  # a time commit, long before 100,000 rows
        assert time.monotonic() < deadline, "no commit within the time"
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.01)
    committed = _committed_rows(manifest)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    stderr = err.decode()
    assert proc.returncode == 128 + sig, stderr
    assert f"stopped by {sig.name}" in stderr and "Run the same command again to resume" in stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr
    kept = _committed_rows(manifest)
    assert committed <= kept < len(rows)
    assert f"{kept:,} input rows are committed" in stderr
    assert not json.loads(manifest.read_text())["complete"]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    table = read_output(out)
    assert table.column("id").to_pylist() == sorted(r["id"] for r in rows)  # each row once


def test_a_changed_option_is_refused_before_the_model_loads(
    model_dir: Path, tmp_path: Path
) -> None:
    rows = corpus(40, seed=3)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.run(_embed_cmd(model_dir, src, out), env=env, capture_output=True)
    assert first.returncode == 0
    changed = _embed_cmd(model_dir, src, out, "--dtype", "float16")
    proc = subprocess.run(changed, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "holds the output of another job (dtype: was 'float32', now 'float16')" in proc.stderr
    assert "loaded all-minilm-l6-v2" not in proc.stderr  # refused before loading it


def test_a_job_is_not_resumed_at_another_model_precision(model_dir: Path, tmp_path: Path) -> None:
    """dtype auto may serve the model in bfloat16 on one machine and float32 on another:
    a job begun at one is not continued at the other (the vectors would mix)."""
    src = write_jsonl(tmp_path / "in.jsonl", corpus(20, seed=4))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", EMBEDSVC_DTYPE="float32")
    first = subprocess.run(_embed_cmd(model_dir, src, out), env=env, capture_output=True)
    assert first.returncode == 0
    env["EMBEDSVC_DTYPE"] = "bfloat16"
    proc = subprocess.run(
        _embed_cmd(model_dir, src, out), env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert "model_precision: was None, now 'bfloat16'" in proc.stderr
    assert "EMBEDSVC_DTYPE=float32 to go on" in proc.stderr


def test_the_input_fingerprint_notices_a_same_size_edit_anywhere(tmp_path: Path) -> None:
    from embedsvc.bulk.sources import open_source

    rows = [{"id": i, "text": f"row {i:07d} " + "x" * 60} for i in range(60_000)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)  # about 5 MB
    before = open_source(str(src), "auto", split=None, revision=None, streaming=False)
    data = bytearray(src.read_bytes())
    middle = data.index(b"row 0030000")
    data[middle + 4 : middle + 11] = b"0030001"  # the same size, in the middle of the file
    src.write_bytes(bytes(data))
    after = open_source(str(src), "auto", split=None, revision=None, streaming=False)
    assert before.fingerprint != after.fingerprint


def test_row_groups_are_bounded_by_bytes(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token vectors make rows of very different sizes: a row group ends at
    ROW_GROUP_BYTES of columns as well as at ROW_GROUP_ROWS rows (the bound made small
    here: a real one takes gigabytes of token vectors to reach)."""
    from embedsvc.bulk import output

    monkeypatch.setattr(output, "ROW_GROUP_BYTES", 50_000)
    rows = corpus(600, seed=5)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert embed(model_dir, str(src), "--output", str(out), "--model", "tiny-bge") == 0
    meta = pq.ParquetFile(next(out.glob("part-*.parquet"))).metadata
    assert meta.num_row_groups > 1
    assert read_output(out).num_rows == 600


def test_progress_shows_from_the_first_forward_pass(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: Any
) -> None:
    """Every request of 256 rows is queued at once and the engine sorts the rows by length,
    so whole requests finish near the end: progress counts the rows forward passes have
    taken, and shows figures between whole requests.
    Progress lines come every 10 s on a terminal-less run; made continuous here."""
    from embedsvc.bulk import job, progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    monkeypatch.setattr(job, "PASS_WATCH_SECONDS", 0.05)
    src = write_jsonl(tmp_path / "in.jsonl", corpus(1200, seed=9))
    args = ["embed", str(src), "--output", str(tmp_path / "out"), "--model", "all-minilm-l6-v2"]
    assert main([*args, "--models-file", str(model_dir / "models.yaml")]) == 0
    import re

    shown = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) rows of 1,200 embedded",
                                                            capfd.readouterr().err)]  # fmt: skip
    # Whole requests only could show 256, 512, 768, 1024 and 1200: a figure between them is
    # a pass's worth (what a slow machine shows first: at most one pass of 128 rows).
    whole = {256, 512, 768, 1024, 1200}
    assert [n for n in shown if n and n not in whole], shown
    assert shown == sorted(shown) and shown[-1] == 1200
