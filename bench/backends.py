"""Offline throughput of the backends on the same texts, in one run, as ratios.

    python bench/backends.py                  # bundled all-MiniLM-L6-v2, exports if needed

torch fp32 vs torch bf16 (the same encoder's linear layers in bfloat16: `--dtype bfloat16`) vs
onnxruntime fp32 vs onnxruntime int8, each through the embedsvc backend class (tokenized
once, sorted by length, batches within the CPU token budget), plus cosine of each against
torch fp32 on the same inputs. `--engines` picks some (the ONNX exports take minutes). The backends
take turns for --rounds rounds and each ratio is the median of its per-round ratios, so a
slow spell of a shared machine hits all of them alike.

It also prints the ceiling this CPU puts on int8: the speed of one int8 matmul (onnxruntime's
DynamicQuantizeMatMul) over the same fp32 matmul, at the model's feed-forward shape. Without
VNNI (AVX-512 VNNI / AVX-VNNI) int8 matmuls run on AVX2 multiply-add pairs and gain far
less than on a CPU with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import rag_mix

from embedsvc.backends import load_model
from embedsvc.engine.batcher import Item, pad
from embedsvc.engine.tokenize import TextTokenizer
from embedsvc.export import export_model
from embedsvc.model_files import resolve_model_dir
from embedsvc.registry import load_registry


def batches(ids: list[list[int]], budget: int) -> list[list[int]]:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(ids[i]) > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return [*out, cur] if cur else out


def run(model, ids: list[list[int]], groups: list[list[int]]) -> tuple[float, np.ndarray]:
    vecs = np.zeros((len(ids), model.backend.dimension), dtype=np.float32)
    t0 = time.perf_counter()
    for g in groups:
        out = model.backend.forward(pad([Item(None, i, ids[i]) for i in g], model.pad_token_id))
        vecs[g] = out.pooled
    rate = len(ids) / (time.perf_counter() - t0)
    return rate, vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def cpu_description() -> str:
    """The CPU's model name and its bf16/int8 matrix and dot-product flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((x.split(":", 1)[1].strip() for x in text.splitlines() if "model name" in x), "?")
    flags = set(text.split())
    wanted = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni")
    return f"{name} ({', '.join(f for f in wanted if f in flags) or 'no bf16/int8 units'})"


def cpu_int8_features() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    if found:
        return ", ".join(found)
    return "none (AVX2 only)" if "avx2" in flags else "none"


def matmul_ceiling(k: int, n: int, rows: int = 2048, reps: int = 30) -> float:
    """Speed of an int8 matmul (dynamic activation quantization) over the fp32 one."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def session(int8: bool):
        if int8:
            inits = [
                numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "W"),
                numpy_helper.from_array(np.full((n,), 0.01, np.float32), "S"),
                numpy_helper.from_array(np.zeros((n,), np.int8), "Z"),
            ]
            node = helper.make_node(
                "DynamicQuantizeMatMul", ["X", "W", "S", "Z"], ["Y"], domain="com.microsoft"
            )
        else:
            inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")]
            node = helper.make_node("MatMul", ["X", "W"], ["Y"])
        graph = helper.make_graph(
            [node],
            "matmul",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n])],
            inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
        )
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    x = rng.standard_normal((rows, k)).astype(np.float32)
    sessions = [session(False), session(True)]
    best = [float("inf"), float("inf")]
    for _ in range(reps):  # alternate, keep the best of each: least disturbed by neighbours
        for j, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, {"X": x})
            best[j] = min(best[j], time.perf_counter() - t0)
    return best[0] / best[1]


def profile_ops(
    model_file: Path, ids: list[list[int]], groups: list[list[int]], pad_id: int
) -> None:
    """Time per operator type over one pass (onnxruntime's profiler), largest first."""
    import collections
    import json
    import os

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
    for g in groups:
        batch = pad([Item(None, i, ids[i]) for i in g], pad_id)
        session.run(None, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    trace = Path(session.end_profiling())
    spent: collections.Counter[str] = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    total = sum(spent.values())
    print(
        f"  {model_file.parent.name}: "
        + ", ".join(f"{op} {100 * t / total:.0f}%" for op, t in spent.most_common(9))
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--texts", type=int, default=600)
    ap.add_argument("--budget", type=int, default=2048, help="padded tokens per batch")
    ap.add_argument("--exports", default=None, help="folder with fp32/ and int8/ exports")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also print time per operator type")
    ap.add_argument(
        "--engines",
        default="torch-fp32,torch-bf16,onnx-fp32,onnx-int8",
        help="comma-separated; torch-fp32 (the reference) is always run",
    )
    args = ap.parse_args()
    engines = {e.strip() for e in args.engines.split(",")} | {"torch-fp32"}
    print(f"CPU: {cpu_description()}", flush=True)

    spec = load_registry().select([args.model])[0]
    path = resolve_model_dir(spec)
    # float32, the reference (the entry's dtype auto may pick bfloat16 on this CPU)
    spec = dataclasses.replace(spec, dtype="float32")
    torch_model = load_model(spec, path)
    texts = rag_mix(args.texts, seed=11)
    tok = TextTokenizer(torch_model.tokenizer, torch_model.max_seq_length)
    ids = tok.encode(texts, prefix="", truncate=True, direction="right", param="inputs")
    groups = batches(ids, args.budget)
    exports = Path(args.exports or tempfile.mkdtemp(prefix="embedsvc-exports-"))
    models = {"torch fp32": torch_model}
    if "torch-bf16" in engines:
        models["torch bf16"] = load_model(dataclasses.replace(spec, dtype="bfloat16"), path)
    for variant in ("fp32", "int8"):
        if f"onnx-{variant}" not in engines:
            continue
        if not (exports / variant / "model.onnx").is_file():
            export_model(spec, path, variant, exports / variant)
        onnx_spec = dataclasses.replace(
            spec, backend="onnx", onnx_variant=variant, onnx_dir=str(exports)
        )
        models[f"onnx {variant}"] = load_model(onnx_spec, path)
    vecs, rates = {}, {name: [] for name in models}
    for name, model in models.items():  # warm up; keep the vectors
        vecs[name] = run(model, ids, groups)[1]
    for r in range(args.rounds):
        for name, model in models.items():
            rates[name].append(run(model, ids, groups)[0])
        print(
            f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}/s" for n, v in rates.items()),
            flush=True,
        )
    base = rates["torch fp32"]
    print()
    print(
        f"{len(texts)} texts (RAG mix), batches of <= {args.budget} padded tokens, "
        f"{args.rounds} rounds (median of per-round ratios)"
    )
    for name in models:
        cos = (vecs[name] * vecs["torch fp32"]).sum(axis=1)
        ratio = float(np.median([a / b for a, b in zip(rates[name], base, strict=True)]))
        print(
            f"ratio {name:10s} / torch fp32 = {ratio:.2f}  ({np.median(rates[name]):.1f} "
            f"inputs/s; cos min {cos.min():.5f}, mean {cos.mean():.5f})"
        )
    if args.profile:
        print("time per operator type (onnxruntime profiler, one pass):")
        for variant in ("fp32", "int8"):
            if f"onnx-{variant}" not in engines:
                continue
            profile_ops(exports / variant / "model.onnx", ids, groups, torch_model.pad_token_id)
    hidden = torch_model.backend.dimension
    ceiling = matmul_ceiling(hidden, 4 * hidden)
    print(
        f"this CPU: int8 matmul / fp32 matmul ({hidden}x{4 * hidden}, 2048 rows) = "
        f"{ceiling:.2f}; int8 dot-product extensions: {cpu_int8_features()}"
    )


if __name__ == "__main__":
    main()
