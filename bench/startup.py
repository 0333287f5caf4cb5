"""Start-up time: from `embedsvc serve` to the first 200 from /health.

    python bench/startup.py                    # bundled MiniLM, 5 starts
    python bench/startup.py --runs 10 -- --models-file my.yaml --models my-model

Each run starts the real CLI on a free port, polls /health every 20 ms and stops the
server once it answers 200. Printed per run: seconds until the port answers at all and
until /health is 200; then the median and the range. The first run may pay for a cold
page cache; the median is the figure to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import free_port, stop


def one_start(extra: list[str]) -> tuple[float, float]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "embedsvc",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listening = 0.0
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "exited")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return listening or time.perf_counter() - t0, time.perf_counter() - t0
            except urllib.error.HTTPError:  # 503: listening, models still loading
                listening = listening or time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.02)
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("serve_args", nargs="*", help="more `embedsvc serve` arguments (after --)")
    args = ap.parse_args()
    ready = []
    for i in range(args.runs):
        up, ok = one_start(args.serve_args)
        ready.append(ok)
        print(f"  run {i + 1}: port answers after {up:.2f} s, /health 200 after {ok:.2f} s")
    print(
        f"ready: median {statistics.median(ready):.2f} s (range {min(ready):.2f}-"
        f"{max(ready):.2f} s over {args.runs} starts)"
    )


if __name__ == "__main__":
    main()
