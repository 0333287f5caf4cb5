"""What each request costs around the model, measured with a compiled load generator.

    apt-get install wrk                     # the load generator (Debian/Ubuntu package)
    python bench/frontend.py                # about 6 minutes on 2 cores
    python bench/frontend.py --rounds 5     # steadier

In one run, on this machine (every server started once; the measurements take turns for
--rounds rounds, and each ratio is the median of the rounds' ratios, since single passes
on a shared VM swing by 20-30%):
  (1) the bundled MiniLM with single-input requests at 64 connections, RAG mix (passages of
      30-120 words and short queries) and short queries alone, and 32-input requests at
      4 connections, each against the offline limit of the same texts
      (SentenceTransformer.encode at its best batch size);
  (2) a near-free model (2-layer, 32-wide BERT) on short queries against a bare ASGI app
      on the same uvicorn stack that parses the same JSON and answers a constant
      384-float vector (bench/bare_app.py): what the HTTP stack alone allows;
  (3) --api-workers 1 and 2, with CPU milliseconds per request spent by the front end
      and by the engine (from /proc: with one process, the event loop's thread is the
      front end and every other thread the engine), and the whole machine's busy CPU per
      request (server, wrk and the kernel's loopback TCP) with its idle share: a run
      with idle cores is bounded by something other than CPU (the GIL, hand-offs);
  (4) the same short queries through embedsvc's engine in this process, without HTTP (64
      concurrent callers): what the engine alone allows;
  (5) latency of MiniLM short queries at concurrency 1 (and the time the server spends
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from throughput import Load, closed_loop, free_port, model_dir, open_loop, start, stop
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
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, bodies[i])
end
"""


def write_bodies(
    folder: Path, name: str, texts: list[str], per_request: int, openai_model: str = ""
) -> Path:
    """One JSON body per line: TEI `/embed` bodies, or OpenAI ones for `openai_model`."""
    path = folder / f"{name}.jsonl"
    with path.open("w") as f:
        for k in range(0, len(texts) - per_request + 1, per_request):
            inputs = texts[k] if per_request == 1 else texts[k : k + per_request]
            body = (
                {"input": inputs, "model": openai_model}
                if openai_model
                else {"inputs": inputs, "truncate": True}
            )
            f.write(json.dumps(body) + "\n")
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


def wrk(
    url: str, bodies: Path, lua: Path, seconds: float, connections: int, threads: int = 1
) -> dict:
    """`url` is the full URL posted to (its path included)."""
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:.0f}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(lua),
        url,
        "--",
        str(bodies),
    ]
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


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine, all cores, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK, idle / TICK


def load_server(
    url: str,
    pid: int,
    bodies: Path,
    lua: Path,
    seconds: float,
    warm: float,
    conns: int = 64,
    threads: int = 1,
) -> dict:
    """wrk against `url` (a full URL); CPU per request of the server process `pid`, and of
    the whole machine (server, wrk and the kernel's loopback TCP), with its idle share."""
    wrk(url, bodies, lua, warm, conns, threads)
    f0, e0 = cpu_seconds(pid)
    b0, i0 = machine_cpu()
    r = wrk(url, bodies, lua, seconds, conns, threads)
    f1, e1 = cpu_seconds(pid)
    b1, i1 = machine_cpu()
    n = max(r["requests"], 1)
    r["front_ms"] = (f1 - f0) / n * 1000
    r["engine_ms"] = (e1 - e0) / n * 1000
    r["machine_ms"] = (b1 - b0) / n * 1000
    r["idle"] = (i1 - i0) / max(b1 - b0 + i1 - i0, 1e-9)
    return r


def serve(models_file: str, model: str, port: int, workers: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "embedsvc",
        "serve",
        "--port",
        str(port),
        "--models",
        model,
        "--api-workers",
        str(workers),
        "--log-level",
        "warning",
    ]
    if models_file:
        cmd += ["--models-file", models_file]
    return start(cmd, port)


def offline_rate(model: Any, texts: list[str], batch_size: int) -> float:
    """Inputs/s of SentenceTransformer.encode over `texts` (sorted by length inside)."""
    t0 = time.perf_counter()
    model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - t0)


def show(label: str, r: dict, per_request: int = 1) -> None:
    cpu = (
        f"CPU/request: front end {r['front_ms']:.3f} ms, engine {r['engine_ms']:.3f} ms, "
        f"machine {r['machine_ms']:.3f} ms ({r['idle']:.0%} idle)"
    )
    errs = r["errors"] + (1 if r["socket_errors"] else 0)
    print(
        f"  {label:34s} {r['rps'] * per_request:9.1f} inputs/s  p50 {r['p50']:>8s}  "
        f"p99 {r['p99']:>8s}  {cpu}  errors {errs}  (wrk CPU {r['wrk_cpu']:.1f} s)"
    )


def tiny_models_file(folder: Path) -> str:
    from tests.support.models import build_tiny_bert

    build_tiny_bert(folder / "tiny", pooling="mean", seed=1)
    path = folder / "models.yaml"
    path.write_text(
        "default_models: [tiny]\nmodels:\n  - name: tiny\n    hf_id: bench/tiny\n"
        "    revision: 0123456789abcdef0123456789abcdef01234567\n"
        f"    local_dir: {folder / 'tiny'}\n    pooling: mean\n    max_seq_length: 128\n"
    )
    return str(path)


def engine_alone(seconds: float) -> float:
    """Short queries/s through embedsvc's engine without HTTP, in a fresh process (torch
    runs slower on a thread other than the one where it first ran, so not in this one)."""
    out = subprocess.run(
        [sys.executable, __file__, "--engine-alone", str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def _engine_alone(seconds: float) -> None:
    from gpu_check import engine_saturation

    from embedsvc.engine import load_engines
    from embedsvc.metrics import Metrics
    from embedsvc.registry import load_registry
    from embedsvc.settings import Settings

    engines = load_engines(load_registry().select(["all-minilm-l6-v2"]), Settings(), Metrics())
    loop = asyncio.new_event_loop()
    engines.start(loop)
    loop.run_until_complete(engine_saturation(engines, queries(300, seed=7), 2, 1, 64))
    print(
        loop.run_until_complete(engine_saturation(engines, queries(2000, seed=6), seconds, 1, 64))
    )
    engines.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per load run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--infinity",
        default="",
        help="an infinity_emb executable (see bench/peer_infinity.py): adds Infinity on the "
        "same models and queries, both servers in the OpenAI dialect",
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/frontend.py needs wrk: apt-get install wrk")
    from sentence_transformers import SentenceTransformer

    secs = args.duration
    tmp = Path(tempfile.mkdtemp(prefix="embedsvc-bench-"))
    lua = tmp / "bodies.lua"
    lua.write_text(LUA)
    mix, short = rag_mix(2000, seed=5, passage_words=(30, 120)), queries(2000, seed=6)
    files = {
        "mix": write_bodies(tmp, "mix", mix, 1),
        "short": write_bodies(tmp, "short", short, 1),
        "mix32": write_bodies(tmp, "mix32", mix, 32),
    }
    print(
        f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; wrk -t1 -c64; "
        f"{args.rounds} rounds of {secs:.0f} s runs"
    )

    path = model_dir("all-minilm-l6-v2")
    offline = SentenceTransformer(path, device="cpu", local_files_only=True)
    offline.encode(short[:64])
    sizes = {}
    for name, texts in (("mix", mix[:600]), ("short", short[:1000])):
        rates = {bs: offline_rate(offline, texts, bs) for bs in (32, 64, 128)}
        sizes[name] = max(rates, key=lambda bs: rates[bs])
        print(
            f"offline batch size for {name}: {sizes[name]} "
            f"({', '.join(f'{bs}: {r:.0f}/s' for bs, r in rates.items())})"
        )

    tiny = tiny_models_file(tmp)
    names = ["m1", "m2", "bare", "t1", "t2"] + (["inf_m", "inf_t"] if args.infinity else [])
    ports = {k: free_port() for k in names}
    paths = {k: "/embed" for k in names}
    if args.infinity:
        os.environ.setdefault("DO_NOT_TRACK", "1")
        os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")
        tiny_dir = str(tmp / "tiny")
        for key, model, folder in (("m", "all-minilm-l6-v2", path), ("t", "tiny", tiny_dir)):
            files[f"oa_{key}"] = write_bodies(tmp, f"oa_{key}", short, 1, model)
            files[f"inf_{key}"] = write_bodies(tmp, f"inf_{key}", short, 1, folder)
        paths |= {"inf_m": "/embeddings", "inf_t": "/embeddings"}
    procs = {
        "m1": serve("", "all-minilm-l6-v2", ports["m1"], 1),
        "m2": serve("", "all-minilm-l6-v2", ports["m2"], 2),
        "bare": start(
            [sys.executable, str(HERE / "bare_app.py"), str(ports["bare"])], ports["bare"]
        ),
        "t1": serve(tiny, "tiny", ports["t1"], 1),
        "t2": serve(tiny, "tiny", ports["t2"], 2),
    }
    if args.infinity:
        for key, folder in (("inf_m", path), ("inf_t", str(tmp / "tiny"))):
            procs[key] = start(
                [
                    args.infinity,
                    "v2",
                    "--model-id",
                    folder,
                    "--engine",
                    "torch",
                    "--device",
                    "cpu",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ports[key]),
                ],
                ports[key],
            )
    url = {k: f"http://127.0.0.1:{p}{paths[k]}" for k, p in ports.items()}
    runs: dict[str, list[dict]] = defaultdict(list)
    ratios: dict[str, list[float]] = defaultdict(list)

    def run(key: str, server: str, bodies: str, conns: int = 64, path: str = "") -> dict:
        target = url[server].removesuffix(paths[server]) + path if path else url[server]
        r = load_server(target, procs[server].pid, files[bodies], lua, secs, 2, conns)
        runs[key].append(r)
        return r

    try:
        for rnd in range(1, args.rounds + 1):
            print(f"round {rnd}")
            off_mix = offline_rate(offline, mix[:600], sizes["mix"])
            off_short = offline_rate(offline, short[:1000], sizes["short"])
            print(f"  offline limit: RAG mix {off_mix:.1f}/s, short queries {off_short:.1f}/s")
            r = run("MiniLM 1-input RAG mix", "m1", "mix")
            ratios["MiniLM 1-input RAG mix / offline"].append(r["rps"] / off_mix)
            r = run("MiniLM 1-input short", "m1", "short")
            ratios["MiniLM 1-input short queries / offline"].append(r["rps"] / off_short)
            rate = engine_alone(secs)
            print(
                f"  MiniLM engine alone (no HTTP), 64 concurrent 1-input short queries: "
                f"{rate:.1f} inputs/s"
            )
            ratios["MiniLM engine alone (no HTTP), 1-input short / offline"].append(
                rate / off_short
            )
            r = run("MiniLM 32-input RAG mix", "m1", "mix32", conns=4)
            ratios["MiniLM 32-input RAG mix (4 connections) / offline"].append(
                r["rps"] * 32 / off_mix
            )
            r = run("MiniLM 1-input short, --api-workers 2", "m2", "short")
            ratios["MiniLM 1-input short, --api-workers 2 / offline"].append(r["rps"] / off_short)
            bare = run("bare ASGI app", "bare", "short")
            for w in (1, 2):
                r = run(f"near-free model, --api-workers {w}", f"t{w}", "short")
                ratios[f"near-free model, --api-workers {w} / bare ASGI app"].append(
                    r["rps"] / bare["rps"]
                )
            if args.infinity:
                for key, model in (("m", "MiniLM"), ("t", "near-free model")):
                    ours = run(
                        f"{model} short, OpenAI dialect",
                        f"{key}1",
                        f"oa_{key}",
                        path="/v1/embeddings",
                    )
                    peer = run(f"Infinity, {model} short", f"inf_{key}", f"inf_{key}")
                    ratios[f"embedsvc / Infinity, {model}, 1-input short queries"].append(
                        ours["rps"] / peer["rps"]
                    )
            for key, rs in runs.items():
                show(key, rs[-1], 32 if "32-input" in key else 1)

        print("latency (MiniLM, --api-workers 1)")
        base = url["m1"].removesuffix("/embed")
        one = asyncio.run(closed_loop(base, Load(short, 1), 1, secs))
        print(
            f"  concurrency 1, short queries: p50 {one['p50_ms']:.2f} ms  "
            f"p99 {one['p99_ms']:.2f} ms; in the server outside the forward pass "
            f"p50 {one['internal_p50_ms']:.2f} ms"
        )
        rate = statistics.median(r["rps"] for r in runs["MiniLM 1-input RAG mix"]) / 2
        half = asyncio.run(open_loop(base, Load(mix, 1), rate, secs))
        print(
            f"  RAG mix at half of saturation ({rate:.0f} req/s, open loop): "
            f"p50 {half['p50_ms']:.1f} ms  p99 {half['p99_ms']:.1f} ms"
        )
    finally:
        for p in procs.values():
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("medians over the rounds:")
    for key, rs in runs.items():
        keys = ("rps", "front_ms", "engine_ms", "machine_ms", "idle")
        med = {k: statistics.median(r[k] for r in rs) for k in keys}
        per = 32 if "32-input" in key else 1
        print(
            f"  {key:40s} {med['rps'] * per:9.1f} inputs/s  CPU/request: front end "
            f"{med['front_ms']:.3f} ms, engine {med['engine_ms']:.3f} ms, machine "
            f"{med['machine_ms']:.3f} ms ({med['idle']:.0%} idle)"
        )
    failed = [k for k, rs in runs.items() if any(r["errors"] or r["socket_errors"] for r in rs)]
    if failed:
        print(f"  RUNS WITH ERRORS (their numbers do not count): {', '.join(failed)}")
    print("ratios (median of the rounds, each round measured back to back):")
    for key, vals in ratios.items():
        print(
            f"  {key:55s} {statistics.median(vals):.2f}   "
            f"(rounds: {', '.join(f'{v:.2f}' for v in vals)})"
        )
    print(
        f"  short query at concurrency 1, in-server time outside the forward pass p50: "
        f"{one['internal_p50_ms']:.2f} ms"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--engine-alone"]:
        from embedsvc.process import exit_now

        _engine_alone(float(sys.argv[2]))
        # Without the interpreter's teardown, as `embedsvc serve` exits: torch's idle
        # thread pools aborted it once in about twenty runs (SIGABRT after the result).
        exit_now(0)
    start_time = time.time()
    main()
    print(f"({time.time() - start_time:.0f} s)")
