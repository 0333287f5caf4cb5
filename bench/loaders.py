"""Forward-pass time of the two torch loading paths for the same model, back to back: the own
BERT-family encoder (backends/bert.py) and the sentence-transformers modules, both traced.

    python bench/loaders.py                # bundled MiniLM, 2 threads

Each shape runs for --seconds per path, twice in alternation; printed: milliseconds per
forward pass (lower is better) and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = ((64, 16), (16, 128), (1, 12))


def main() -> None:
    import torch

    from embedsvc.backends.base import BackendSpec, PaddedBatch
    from embedsvc.backends.torch_backend import (
        TorchBackend,
        _load_sentence_transformers,
        load_torch_model,
    )
    from embedsvc.model_files import resolve_model_dir
    from embedsvc.registry import load_registry

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_registry().select([args.model])[0]
    spec, path = BackendSpec.of(model), resolve_model_dir(model)
    own = load_torch_model(spec, path).backend
    parts = _load_sentence_transformers(spec, path, "cpu", "float32")
    st = TorchBackend(parts.encoder, parts.head, "cpu", "float32", parts.dimension)
    rng = np.random.default_rng(0)
    for rows, cols in SHAPES:
        ids = rng.integers(1000, 20000, (rows, cols))
        batch = PaddedBatch(ids, np.ones_like(ids))
        times: dict[str, list[float]] = {"own encoder": [], "sentence-transformers": []}
        for _ in range(2):
            for name, backend in (("own encoder", own), ("sentence-transformers", st)):
                backend.forward(batch)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds:
                    backend.forward(batch)
                    n += 1
                times[name].append((time.perf_counter() - t0) / n * 1000)
        a, b = times["own encoder"], times["sentence-transformers"]
        print(
            f"{rows:3d} x {cols:3d} tokens: own {a[0]:.2f}/{a[1]:.2f} ms, "
            f"sentence-transformers {b[0]:.2f}/{b[1]:.2f} ms, "
            f"ratio {min(a) / min(b):.3f}"
        )


if __name__ == "__main__":
    main()
