"""`embedsvc pull` end to end against a local Hub emulation, then serving offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.hub_emulator import HubEmulator
from tests.support.models import MINILM_PATH

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
PICKLE_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture()
def hub(model_dir: Path, tmp_path: Path) -> Iterator[tuple[HubEmulator, str]]:
    emu = HubEmulator()
    repo = tmp_path / "repo"
    shutil.copytree(model_dir / "tiny-bge", repo)
    # Files a serving pull must skip: pickle weights and an ONNX copy.
    (repo / "pytorch_model.bin").write_bytes(b"pickle, never to be downloaded")
    (repo / "onnx").mkdir()
    (repo / "onnx" / "model.onnx").write_bytes(b"onnx copy")
    emu.add_folder("org/tiny-bge", COMMIT, repo)
    pickled = tmp_path / "pickled"
    shutil.copytree(MINILM_PATH, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    emu.add_folder("org/pickled", PICKLE_COMMIT, pickled)
    url = emu.start()
    yield emu, url
    emu.stop()


def models_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(f"""
models:
  - name: tiny-bge
    hf_id: org/tiny-bge
    revision: {COMMIT}
    pooling: cls
    prompts: {{query: "q: "}}
    query_prompt: query
  - name: pickled
    hf_id: org/pickled
    revision: {PICKLE_COMMIT}
""")
    return path


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedsvc", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def base_env(tmp_path: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EMBEDSVC_"))}
    env.update(
        HF_ENDPOINT=url,
        HF_HOME=str(tmp_path / "hf"),
        HF_TOKEN="hf_test_token",
        HF_HUB_DISABLE_XET="1",
    )
    return env


def test_pull_then_serve_offline(hub: tuple[HubEmulator, str], tmp_path: Path) -> None:
    emu, url = hub
    cfg = models_yaml(tmp_path)
    env = base_env(tmp_path, url)
    proc = run(["pull", "--models-file", str(cfg), "--models", "tiny-bge"], env)
    assert proc.returncode == 0, proc.stderr
    assert "loads offline (dim 32)" in proc.stderr
    got = emu.downloaded()
    assert "model.safetensors" in got and "tokenizer.json" in got and "1_Pooling/config.json" in got
    assert "pytorch_model.bin" not in got and "onnx/model.onnx" not in got
    model_routes = [r for r in emu.requests if "/tree/" in r[1] or "/resolve/" in r[1]]
    assert model_routes and all(auth == "Bearer hf_test_token" for _, _, auth in model_routes)
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny-bge" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_file()
    assert "hf_test_token" not in proc.stderr + proc.stdout
    # The pull recorded every fetched file's sha256 beside models.yaml: the Hub's own for
    # the weights (LFS), the bytes' for the others.
    import hashlib
    import json

    locked = json.loads((tmp_path / "models.lock.json").read_text())["models"]
    files = locked[f"org/tiny-bge@{COMMIT}"]["files"]
    repo = emu.repos["org/tiny-bge"].files
    assert set(files) == {n for n in repo if n.endswith((".json", ".safetensors", ".txt"))}
    for name, digest in files.items():
        assert digest == hashlib.sha256(repo[name]).hexdigest()

    # Now serve with the Hub unreachable: only the cache is used.
    emu.requests.clear()
    offline = dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    from tests.support import free_socket

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedsvc",
            "serve",
            "--models-file",
            str(cfg),
            "--models",
            "tiny-bge",
            "--port",
            str(port),
        ],
        env=offline,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        import time

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.communicate()[0]
            time.sleep(0.2)
        r = httpx.post(
            f"http://127.0.0.1:{port}/embed", json={"inputs": "hello", "prompt_name": "query"}
        )
        assert r.status_code == 200 and len(r.json()[0]) == 32
        info = httpx.get(f"http://127.0.0.1:{port}/info").json()
        assert info["model_sha"] == COMMIT and info["models"][0]["source"] == "hf_cache"
        assert info["models"][0]["files_verified"] is True
    finally:
        server.terminate()
        server.communicate(timeout=60)
    assert emu.requests == []  # serving never called the Hub


def test_pull_to_local_dir(hub: tuple[HubEmulator, str], tmp_path: Path) -> None:
    _, url = hub
    cfg = models_yaml(tmp_path)
    out = tmp_path / "models"
    proc = run(
        ["pull", "--models-file", str(cfg), "--models", "tiny-bge", "--local-dir", str(out)],
        base_env(tmp_path, url),
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "tiny-bge" / "model.safetensors").is_file()
    assert not (out / "tiny-bge" / "pytorch_model.bin").exists()


def test_pull_refuses_pickle_only(hub: tuple[HubEmulator, str], tmp_path: Path) -> None:
    emu, url = hub
    proc = run(
        ["pull", "--models-file", str(models_yaml(tmp_path)), "--models", "pickled"],
        base_env(tmp_path, url),
    )
    assert proc.returncode == 2
    assert "only pickle weights (pytorch_model.bin)" in proc.stderr
    assert emu.downloaded() == set()  # refused before downloading anything


def test_pull_unknown_revision_is_a_clear_error(
    hub: tuple[HubEmulator, str], tmp_path: Path
) -> None:
    _, url = hub
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        "models:\n  - name: gone\n    hf_id: org/tiny-bge\n"
        "    revision: 0000000000000000000000000000000000000000\n"
    )
    proc = run(["pull", "--models-file", str(cfg)], base_env(tmp_path, url))
    assert proc.returncode != 0
    assert "gone" in proc.stderr or "org/tiny-bge" in proc.stderr


def test_pull_fetches_the_bge_m3_sparse_head(model_dir: Path, tmp_path: Path) -> None:
    """lexical_weights: the pickled sparse_linear.pt is fetched (and only that pickle), and
    the pulled model loads with it (torch.load(weights_only=True))."""
    import torch

    repo = tmp_path / "m3"
    shutil.copytree(model_dir / "tiny-bge", repo)
    torch.save({"weight": torch.randn(1, 32), "bias": torch.zeros(1)}, repo / "sparse_linear.pt")
    torch.save({"weight": torch.randn(32, 32)}, repo / "colbert_linear.pt")
    emu = HubEmulator()
    emu.add_folder("org/tiny-m3", COMMIT, repo)
    url = emu.start()
    try:
        cfg = tmp_path / "models.yaml"
        cfg.write_text(
            f"models:\n  - name: tiny-m3\n    hf_id: org/tiny-m3\n"
            f"    revision: {COMMIT}\n    lexical_weights: true\n"
        )
        proc = run(
            ["pull", "--models-file", str(cfg), "--models", "tiny-m3"], base_env(tmp_path, url)
        )
        assert proc.returncode == 0, proc.stderr
        got = emu.downloaded()
        assert "sparse_linear.pt" in got and "colbert_linear.pt" not in got
    finally:
        emu.stop()


def test_a_changed_or_added_file_stops_loading_with_its_name(
    hub: tuple[HubEmulator, str], tmp_path: Path
) -> None:
    """Files are checked against the lock at load: one that differs (even a config), or
    one the lock does not list, is named; a model with no lock entry loads unverified."""
    from embedsvc.errors import ConfigError
    from embedsvc.model_files import verify_model_files
    from embedsvc.registry import load_registry

    _, url = hub
    cfg = models_yaml(tmp_path)
    env = base_env(tmp_path, url)
    assert run(["pull", "--models-file", str(cfg), "--models", "tiny-bge"], env).returncode == 0
    spec = load_registry(cfg).models["tiny-bge"]
    path = tmp_path / "hf" / "hub" / "models--org--tiny-bge" / "snapshots" / COMMIT
    assert verify_model_files(spec, path) is True
    blob = (path / "tokenizer_config.json").resolve()  # the cache's blob behind the link
    original = blob.read_bytes()
    blob.write_bytes(original.replace(b"}", b', "model_max_length": 9}', 1))
    with pytest.raises(ConfigError, match=r"tokenizer_config.json differs from the pinned"):
        verify_model_files(spec, path)
    blob.write_bytes(original)
    assert verify_model_files(spec, path) is True
    # The same size, two bytes swapped, the old mtime set back: the hash cache is keyed on
    # the ctime and inode too, which no user code can set back.
    weights = (path / "model.safetensors").resolve()
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    tail = len(data) - 8
    data[tail], data[tail + 4] = data[tail + 4], data[tail]
    assert bytes(data) != weights.read_bytes()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ConfigError, match=r"model.safetensors differs from the pinned"):
        verify_model_files(spec, path)
    weights.write_bytes(bytes(data[:tail]) + original_tail(st, data, tail))
    assert verify_model_files(spec, path) is True
    (path / "extra.safetensors").write_bytes(b"not pulled")
    with pytest.raises(ConfigError, match=r"files the lock does not list \(extra.safetensors"):
        verify_model_files(spec, path)
    (path / "extra.safetensors").unlink()
    export = path / "embedsvc-onnx" / "int8"  # where `embedsvc export` puts its output
    export.mkdir(parents=True)
    (export / "export.json").write_text("{}")
    assert verify_model_files(spec, path) is True
    (tmp_path / "models.lock.json").unlink()
    unlocked = load_registry(cfg).models["tiny-bge"]
    assert unlocked.lock is None and verify_model_files(unlocked, path) is False


def original_tail(st: os.stat_result, data: bytearray, tail: int) -> bytes:
    """The last 8 bytes with the two swapped back."""
    out = bytearray(data[tail:])
    out[0], out[4] = out[4], out[0]
    return bytes(out)


def test_pull_never_records_a_cached_file_that_differs(
    hub: tuple[HubEmulator, str], tmp_path: Path
) -> None:
    """A cached file changed after the pull: `serve` refuses it (above), and a second pull
    fetches it again rather than recording it (exit 0, the lock as it was, the file as
    pinned). When the Hub itself now serves another file for the pinned commit, pull
    refuses with its name and leaves the lock alone. `embedsvc verify` hashes every file
    again, so a stale hash cache cannot vouch for a changed file."""
    import json

    emu, url = hub
    cfg = models_yaml(tmp_path)
    env = dict(base_env(tmp_path, url), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    pull = ["pull", "--models-file", str(cfg), "--models", "tiny-bge"]
    assert run(pull, env).returncode == 0
    lock = tmp_path / "models.lock.json"
    recorded = lock.read_text()
    path = tmp_path / "hf" / "hub" / "models--org--tiny-bge" / "snapshots" / COMMIT
    blob = (path / "tokenizer.json").resolve()
    pinned = blob.read_bytes()
    blob.write_bytes(pinned.replace(b'"[UNK]"', b'"[UNQ]"', 1))
    proc = run(pull, env)
    assert proc.returncode == 0, proc.stderr
    assert lock.read_text() == recorded and (path / "tokenizer.json").read_bytes() == pinned
    verify = ["verify", "--models-file", str(cfg), "--models", "tiny-bge"]
    proc = run(verify, env)
    assert proc.returncode == 0 and "all as the lock records" in proc.stderr, proc.stderr

    # A stale hash cache (it claims the changed file's key still has the pinned hash):
    # serving's check trusts it, `verify` does not.
    (path / "tokenizer.json").resolve().write_bytes(pinned.replace(b'"[UNK]"', b'"[UNQ]"', 1))
    changed = (path / "tokenizer.json").resolve()
    cache_file = tmp_path / "xdg" / "embedsvc" / "sha256-v2.json"
    cache = json.loads(cache_file.read_text())
    st = changed.stat()
    want = json.loads(recorded)["models"][f"org/tiny-bge@{COMMIT}"]["files"]["tokenizer.json"]
    cache[str(changed)] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, want]
    cache_file.write_text(json.dumps(cache))
    proc = run(verify, env)
    assert proc.returncode == 2 and "tokenizer.json differs from the pinned" in proc.stderr

    # The Hub now serves another tokenizer.json for the pinned commit (and the cached one
    # is changed, so it is fetched): refused by name.
    cache_file.unlink()
    emu.repos["org/tiny-bge"].files["tokenizer.json"] = pinned.replace(b"[UNK]", b"[UNX]", 1)
    proc = run(pull, env)
    assert proc.returncode == 2, proc.stderr
    assert "tokenizer.json" in proc.stderr and "Traceback" not in proc.stderr
    assert lock.read_text() == recorded


def test_the_bundled_default_model_is_verified() -> None:
    """The default model's package files have the sha256 the shipped lock records."""
    from embedsvc.model_files import resolve_model_dir, verify_model_files
    from embedsvc.registry import load_registry

    spec = load_registry().models["all-minilm-l6-v2"]
    assert spec.lock is not None and "model.safetensors" in spec.lock.files
    assert verify_model_files(spec, resolve_model_dir(spec)) is True


CODE_COMMIT = "c0de0000000000000000000000000000c0de0000"
REMOTE_CODE = b"""from transformers import BertModel


class TinyRemoteModel(BertModel):
    \"\"\"A model class from another repository, as Nomic's config names its code.\"\"\"
"""


def test_remote_code_from_another_repository_is_pinned(model_dir: Path, tmp_path: Path) -> None:
    """An entry whose config.json takes code from another repository: refused until
    code_revision pins that repository; then `pull` fetches the code at that commit and
    records its sha256, the model loads with it offline, and changed code is refused."""
    import json

    repo = tmp_path / "remote"
    shutil.copytree(model_dir / "tiny-bge", repo)
    config = json.loads((repo / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "org/tiny-code--modeling_tiny.TinyRemoteModel"}
    (repo / "config.json").write_text(json.dumps(config))
    code = tmp_path / "code"
    code.mkdir()
    (code / "modeling_tiny.py").write_bytes(REMOTE_CODE)
    emu = HubEmulator()
    emu.add_folder("org/tiny-remote", COMMIT, repo)
    emu.add_folder("org/tiny-code", CODE_COMMIT, code)
    url = emu.start()
    entry = (
        f"default_models: [tiny-remote]\nmodels:\n  - name: tiny-remote\n"
        f"    hf_id: org/tiny-remote\n    revision: {COMMIT}\n    pooling: cls\n"
        f"    trust_remote_code: true\n"
    )
    try:
        env = base_env(tmp_path, url)
        cfg = tmp_path / "models.yaml"
        cfg.write_text(entry)
        proc = run(["pull", "--models-file", str(cfg)], env)
        assert proc.returncode == 2, proc.stderr
        assert "takes its code from another repository, org/tiny-code" in proc.stderr
        assert "code_revision" in proc.stderr
        cfg.write_text(entry + f"    code_revision: {CODE_COMMIT}\n")
        proc = run(["pull", "--models-file", str(cfg)], env)
        assert proc.returncode == 0, proc.stderr
        assert "modeling_tiny.py" in emu.downloaded()
        assert "remote code at c0de00000000" in proc.stderr  # loaded with the pinned code
        locked = json.loads((tmp_path / "models.lock.json").read_text())["models"]
        import hashlib

        assert locked[f"org/tiny-remote@{COMMIT}"]["code"] == {
            "modeling_tiny.py": hashlib.sha256(REMOTE_CODE).hexdigest()
        }
        offline = dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
        snapshot = tmp_path / "hf" / "hub" / "models--org--tiny-code" / "snapshots" / CODE_COMMIT
        blob = (snapshot / "modeling_tiny.py").resolve()
        blob.write_bytes(REMOTE_CODE + b"\nprint('changed')\n")
        said = refused_start(cfg, offline)
        assert "code org/tiny-code@c0de00000000" in said
        assert "modeling_tiny.py differs from the pinned" in said
        shutil.rmtree(snapshot)  # and code that is not there at all
        said = refused_start(cfg, offline)
        assert "its code, org/tiny-code@c0de00000000, is not in the Hugging Face" in said
    finally:
        emu.stop()


def refused_start(cfg: Path, env: dict[str, str]) -> str:
    """`embedsvc serve` with this models file, which must stop at start: what it said."""
    served = subprocess.run(
        [sys.executable, "-m", "embedsvc", "serve", "--models-file", str(cfg), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert served.returncode != 0
    return served.stderr


def test_pull_of_a_locked_cached_model_needs_no_hub(
    hub: tuple[HubEmulator, str], tmp_path: Path
) -> None:
    """Once pulled and locked, a model whose files are all in the cache as locked pulls
    again with the Hub unreachable, without asking it (HF_HUB_OFFLINE unset, as an init
    container runs it on every pod start), in one line; a file gone from the cache then
    is one clear error naming the model, never a traceback."""
    emu, url = hub
    cfg = models_yaml(tmp_path)
    env = base_env(tmp_path, url)
    pull = ["pull", "--models-file", str(cfg), "--models", "tiny-bge", "--no-load-check"]
    assert run(pull, env).returncode == 0
    emu.requests.clear()
    unreachable = dict(env, HF_ENDPOINT="http://127.0.0.1:9")
    import time

    started = time.monotonic()
    proc = run(pull, unreachable)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 30
    assert "every pinned file is in the cache as locked" in proc.stderr
    assert len([x for x in proc.stderr.splitlines() if "model tiny-bge" in x]) == 1
    assert "loads offline" not in proc.stderr  # --no-load-check: files only
    assert emu.requests == []
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny-bge" / "snapshots" / COMMIT
    (snapshot / "tokenizer.json").unlink()
    proc = run(pull, unreachable)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("embedsvc: ")]
    assert "model tiny-bge: tokenizer.json" in line and "could not be fetched" in line


def test_serve_with_require_verified_refuses_an_unlocked_model_before_loading(
    model_dir: Path, tmp_path: Path
) -> None:
    """--require-verified (EMBEDSVC_REQUIRE_VERIFIED): a model with no lock entry stops
    start-up at once, before any model loads, naming it; so does a model whose folder is
    missing, before the others load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSVC_")}
    env["HF_HOME"] = str(tmp_path / "hf")
    cmd = ["serve", "--models-file", str(model_dir / "models.yaml"), "--port", "0"]
    proc = run([*cmd, "--models", "all-minilm-l6-v2,tiny-bge", "--require-verified"], env)
    assert proc.returncode == 2
    assert "tiny-bge: no entry in the models lock, and require_verified" in proc.stderr
    assert "loaded " not in proc.stderr
    broken = tmp_path / "models.yaml"
    text = (model_dir / "models.yaml").read_text()
    broken.write_text(text.replace(str(model_dir / "tiny-nomic"), str(tmp_path / "gone")))
    proc = run(["serve", "--models-file", str(broken), "--models", "tiny-bge,tiny-nomic"], env)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "loaded " not in proc.stderr
