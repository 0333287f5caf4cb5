"""What each request costs around the model, measured with a compiled load generator.

    apt-get install wrk                     # the load generator (Debian/Ubuntu package)
    python bench/frontend.py                # about 6 minutes on 2 cores
    python bench/frontend.py --duration 20  # steadier

In one run, on this machine:
  (1) the bundled MiniLM with single-input requests at 64 connections, RAG mix (passages of
      30-120 words and short queries) and short queries alone, and 32-input requests at
      4 connections, each against the offline limit of the same texts
      (SentenceTransformer.encode at its best batch size);
  (2) a near-free model (2-layer, 32-wide BERT) on short queries against a bare ASGI app
      on the same uvicorn stack that parses the same JSON and answers a constant
      384-float vector (bench/bare_app.py): what the HTTP stack alone allows;
  (3) --api-workers 1 and 2, with CPU milliseconds per request spent by the front end
      and by the engine (from /proc: with one process, the event loop's thread is the
      front end and every other thread the engine);
  (4) latency of MiniLM short queries at concurrency 1 (and the time the server spends
      outside the forward pass, from its timing headers), and p50/p99 of the RAG mix at
      half of saturation (open loop, Poisson arrivals).
wrk runs one thread and shares the cores with the server; its own CPU time is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from throughput import (
    Load,
    closed_loop,
    free_port,
    model_dir,
    offline_limit,
    open_loop,
    start,
    stop,
)
from workload import queries, rag_mix

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")

LUA = """
local bodies = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  i = math.random(#bodies)
end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/embed", {["Content-Type"] = "application/json"}, bodies[i])
end
"""


def write_bodies(folder: Path, name: str, texts: list[str], per_request: int) -> Path:
    path = folder / f"{name}.jsonl"
    with path.open("w") as f:
        for k in range(0, len(texts) - per_request + 1, per_request):
            inputs = texts[k] if per_request == 1 else texts[k : k + per_request]
            f.write(json.dumps({"inputs": inputs, "truncate": True}) + "\n")
    return path


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(front end, engine) CPU seconds of a server: its child processes are front ends;
    in a lone process the thread whose id is the pid (the event loop) is."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    front = sum(_proc_cpu(c) for c in children if b"spawn_main" in _cmdline(c))
    engine = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        t = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        if not front and int(tid) == pid:
            front += t
        else:
            engine += t
    return front, engine


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _proc_cpu(pid: int) -> float:
    return sum(_stat_cpu(f"/proc/{pid}/task/{t}/stat") for t in os.listdir(f"/proc/{pid}/task"))


def _stat_cpu(path: str) -> float:
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def wrk(url: str, bodies: Path, lua: Path, seconds: float, connections: int) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "30s",
           "--latency", "-s", str(lua), url + "/embed", "--", str(bodies)]  # fmt: skip
    t0 = os.times()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    t1 = os.times()
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "errors": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
        "p50": lat.get("50", "?"),
        "p99": lat.get("99", "?"),
        "wrk_cpu": _children_cpu(t1) - _children_cpu(t0),
    }


def _children_cpu(t: os.times_result) -> float:
    return t.children_user + t.children_system


def load_server(
    url: str, pid: int, bodies: Path, lua: Path, seconds: float, warm: float, conns: int = 64
) -> dict:
    wrk(url, bodies, lua, warm, conns)
    f0, e0 = cpu_seconds(pid)
    r = wrk(url, bodies, lua, seconds, conns)
    f1, e1 = cpu_seconds(pid)
    n = max(r["requests"], 1)
    r["front_ms"] = (f1 - f0) / n * 1000
    r["engine_ms"] = (e1 - e0) / n * 1000
    return r


def serve(models_file: str, model: str, port: int, workers: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "embedsvc", "serve", "--port", str(port), "--models", model,
           "--api-workers", str(workers), "--log-level", "warning"]  # fmt: skip
    if models_file:
        cmd += ["--models-file", models_file]
    return start(cmd, port)


def show(label: str, r: dict, per_request: int = 1) -> None:
    cpu = f"CPU/request: front end {r['front_ms']:.2f} ms, engine {r['engine_ms']:.2f} ms"
    errs = r["errors"] + (1 if r["socket_errors"] else 0)
    print(f"  {label:34s} {r['rps'] * per_request:9.1f} inputs/s  p50 {r['p50']:>8s}  "
          f"p99 {r['p99']:>8s}  {cpu}  errors {errs}  (wrk CPU {r['wrk_cpu']:.1f} s)")  # fmt: skip


def tiny_models_file(folder: Path) -> str:
    from tests.models import build_tiny_bert

    build_tiny_bert(folder / "tiny", pooling="mean", seed=1)
    path = folder / "models.yaml"
    path.write_text(
        "default_models: [tiny]\nmodels:\n  - name: tiny\n    hf_id: bench/tiny\n"
        "    revision: 0123456789abcdef0123456789abcdef01234567\n"
        f"    local_dir: {folder / 'tiny'}\n    pooling: mean\n    max_seq_length: 128\n"
    )
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    ap.add_argument("--texts", type=int, default=2000)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/frontend.py needs wrk: apt-get install wrk")
    secs, warm = args.duration, max(2.0, args.duration / 4)
    tmp = Path(tempfile.mkdtemp(prefix="embedsvc-bench-"))
    lua = tmp / "bodies.lua"
    lua.write_text(LUA)
    mix, short = rag_mix(args.texts, seed=5, passage_words=(30, 120)), queries(args.texts, seed=6)
    files = {
        "mix": write_bodies(tmp, "mix", mix, 1),
        "short": write_bodies(tmp, "short", short, 1),
        "mix32": write_bodies(tmp, "mix32", mix, 32),
    }
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; wrk -t1 -c64")

    print("(1) bundled all-MiniLM-L6-v2: offline limit of the same texts")
    path = model_dir("all-minilm-l6-v2")
    _, off_mix = offline_limit(path, mix, [32, 64, 128])
    _, off_short = offline_limit(path, short, [32, 64, 128])

    results: dict[str, dict] = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for workers in (1, 2):
        proc = serve("", "all-minilm-l6-v2", port, workers)
        try:
            print(f"    embedsvc --api-workers {workers}")
            for name in ("mix", "short") if workers == 1 else ("short",):
                r = results[f"minilm-{name}-{workers}"] = load_server(
                    url, proc.pid, files[name], lua, secs, warm
                )
                show(f"1-input {name}", r)
            if workers == 1:
                r = results["minilm-mix32-1"] = load_server(
                    url, proc.pid, files["mix32"], lua, secs, warm, conns=4
                )
                show("32-input mix (4 connections)", r, 32)
                print("(4) latency, --api-workers 1")
                one = asyncio.run(closed_loop(url, Load(short, 1), 1, secs))
                results["c1"] = one
                print(f"  concurrency 1, short queries: p50 {one['p50_ms']:.2f} ms  "
                      f"p99 {one['p99_ms']:.2f} ms; in the server outside the forward pass "
                      f"p50 {one['internal_p50_ms']:.2f} ms")  # fmt: skip
                rate = results["minilm-mix-1"]["rps"] / 2
                half = asyncio.run(open_loop(url, Load(mix, 1), rate, secs))
                results["half"] = {"rate": rate, **half}
                print(f"  RAG mix at half of saturation ({rate:.0f} req/s, open loop): "
                      f"p50 {half['p50_ms']:.1f} ms  p99 {half['p99_ms']:.1f} ms")  # fmt: skip
        finally:
            stop(proc)

    print("(2) near-free model (2-layer, 32-wide BERT), short queries, vs a bare ASGI app")
    tiny = tiny_models_file(tmp)
    bare = start([sys.executable, str(HERE / "bare_app.py"), str(port)], port)
    try:
        r = results["bare"] = load_server(url, bare.pid, files["short"], lua, secs, warm)
        show("bare ASGI app (constant vector)", r)
    finally:
        stop(bare)
    for workers in (1, 2):
        proc = serve(tiny, "tiny", port, workers)
        try:
            r = results[f"tiny-{workers}"] = load_server(
                url, proc.pid, files["short"], lua, secs, warm
            )
            show(f"embedsvc --api-workers {workers}", r)
        finally:
            stop(proc)

    print()
    print("ratios (same run):")
    mix1, short1 = results["minilm-mix-1"]["rps"], results["minilm-short-1"]["rps"]
    print(f"  MiniLM 1-input RAG mix       / offline: {mix1:7.1f} / {off_mix:7.1f} = "
          f"{mix1 / off_mix:.2f}")  # fmt: skip
    print(f"  MiniLM 1-input short queries / offline: {short1:7.1f} / {off_short:7.1f} = "
          f"{short1 / off_short:.2f}")  # fmt: skip
    m32 = results["minilm-mix32-1"]["rps"] * 32
    print(f"  MiniLM 32-input RAG mix      / offline: {m32:7.1f} / {off_mix:7.1f} = "
          f"{m32 / off_mix:.2f}")  # fmt: skip
    s2 = results["minilm-short-2"]["rps"]
    print(f"  MiniLM short queries, --api-workers 2 / offline: {s2 / off_short:.2f}")
    b = results["bare"]["rps"]
    for workers in (1, 2):
        t = results[f"tiny-{workers}"]["rps"]
        print(f"  near-free model, --api-workers {workers} / bare ASGI app: {t:7.1f} / {b:7.1f}"
              f" = {t / b:.2f}")  # fmt: skip
    print(f"  short query at concurrency 1, in-server time outside the forward pass p50: "
          f"{results['c1']['internal_p50_ms']:.2f} ms")  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    start_time = time.time()
    main()
    print(f"({time.time() - start_time:.0f} s)")
