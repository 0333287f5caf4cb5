"""What `dtype: auto` does for the large shapes, offline, in one run: a BGE-M3-shaped model
(XLM-RoBERTa large: 24 layers of 1024, dense + lexical + ColBERT outputs) and a
Qwen3-Embedding-0.6B-shaped decoder (28 layers of 1024, last-token pooling), random
weights of the real shapes built here (the vocabularies are the test tokenizers': an
embedding row costs the same whatever the vocabulary's size).

    .venv/bin/python bench/shapes.py              # about 10 minutes on 2 CPUs
    .venv/bin/python bench/shapes.py --shape qwen3-0.6b --texts 32

For each shape, on the same RAG-mix texts (passages of 30-120 words, queries of 4-14):
embedsvc's backend as the server loads it at `--dtype float32` and at `auto` (which says
what it chose and why), sentence-transformers' encode in torch fp32 and with bf16
weights, and OpenVINO at its default precision where installed (bench/matrix_units.py).
Rates in inputs/s (best of --rounds), worst cosine to torch fp32 of every output
(dense vectors; for the BGE-M3 shape also each row of lexical weights and each token's
ColBERT vector, against embedsvc's float32).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backends import batches, cpu_description
from matrix_units import openvino_engines, st_engine, unit
from workload import rag_mix

from embedsvc.backends import load_model
from embedsvc.backends.base import BackendSpec, ForwardOutput
from embedsvc.backends.precision import worst_cosine
from embedsvc.engine.batcher import Item, pad
from embedsvc.engine.tokenize import TextTokenizer


def copy_tokenizer(out: Path) -> None:
    """MiniLM's tokenizer (30522 WordPiece tokens, [SEP] last): about as many tokens per
    word as the real models' own."""
    from tests.support.models import MINILM_PATH

    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(MINILM_PATH / name, out / name)


def build_m3(out: Path) -> Path:
    """XLM-RoBERTa large with BGE-M3's two heads."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    copy_tokenizer(out)
    config = XLMRobertaConfig(
        vocab_size=30522,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=8194,
        pad_token_id=0,
        type_vocab_size=1,
    )
    torch.manual_seed(0)
    XLMRobertaModel(config, add_pooling_layer=False).eval().save_pretrained(str(out))
    torch.save(
        {"weight": torch.randn(1, 1024) / 32, "bias": torch.zeros(1)}, out / "sparse_linear.pt"
    )
    colbert = {"weight": torch.randn(1024, 1024) / 32, "bias": torch.zeros(1024)}
    torch.save(colbert, out / "colbert_linear.pt")
    _st_files(out, 1024, 512, "pooling_mode_cls_token")
    return out


def build_qwen3(out: Path) -> Path:
    """Qwen3-Embedding-0.6B's decoder shape (last-token pooling: the [SEP] at the end)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    copy_tokenizer(out)
    config = Qwen3Config(
        vocab_size=30522,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        eos_token_id=102,
        pad_token_id=0,
        bos_token_id=101,
    )
    torch.manual_seed(0)
    Qwen3Model(config).eval().save_pretrained(str(out))
    _st_files(out, 1024, 512, "pooling_mode_lasttoken")
    return out


def _st_files(out: Path, dimension: int, max_len: int, pooling: str) -> None:
    kinds = (("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize"))
    modules = [
        {"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{k}"}
        for i, (p, k) in enumerate(kinds)
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len}))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": dimension, pooling: True})
    )
    (out / "2_Normalize").mkdir()


def spec_for(name: str, folder: Path, dtype: str, lexical: bool = True) -> BackendSpec:
    from tests.support import spec

    m3 = name == "bge-m3"
    pooling = "cls" if m3 else "lasttoken"
    return spec(
        name, dtype=dtype, pooling=pooling, max_seq_length=512, lexical_weights=m3 and lexical,
        multivector=m3,
    )  # fmt: skip


def embedsvc_run(model: Any, texts: list[str], rounds: int) -> tuple[float, list[ForwardOutput]]:
    tok = TextTokenizer(model.tokenizer, model.max_seq_length)
    ids = tok.encode(texts, prefix="", truncate=True, direction="right", param="inputs")
    groups = batches(ids, 2048)  # the server's batch budget on a CPU
    vectors = model.backend.token_vectors
    padded = []
    for g in groups:
        b = pad([Item(None, i, ids[i]) for i in g], model.pad_token_id)
        b.token_vectors = vectors
        padded.append((g, b))
    best, outs = 0.0, []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = [model.backend.forward(b) for _, b in padded]
        best = max(best, len(texts) / (time.perf_counter() - t0))
    order = [i for g, _ in padded for i in g]
    dense = np.empty((len(texts), outs[0].pooled.shape[1]), np.float32)
    dense[order] = np.concatenate([o.pooled for o in outs])
    return best, [ForwardOutput(dense), *outs]


def measure(name: str, folder: Path, texts: list[str], rounds: int, openvino: bool) -> None:
    print(f"\n{name}-shaped ({folder}), {len(texts)} texts:", flush=True)
    st = st_engine(str(folder), False)
    reference = unit(st(texts, 32))
    engines = {"sentence-transformers fp32": st, "sentence-transformers bf16": None}
    if openvino:
        engines.update(openvino_engines(str(folder)))
    rows = []
    for label, engine in engines.items():
        encode = engine or st_engine(str(folder), True)
        encode(texts[:8], 8)
        best, vectors = 0.0, None
        for _ in range(rounds):
            t0 = time.perf_counter()
            vectors = encode(texts, 32)
            best = max(best, len(texts) / (time.perf_counter() - t0))
        cos = float((unit(vectors) * reference).sum(1).min())
        rows.append((label, best, cos, ""))
        print(f"  {label:34s} {best:7.2f} inputs/s  dense min cos {cos:.5f}", flush=True)
    outputs = {}
    variants = [("float32", True), ("auto", True)]
    if name == "bge-m3":  # an entry that serves its dense and ColBERT outputs alone
        variants.append(("auto", False))
    for dtype, lexical in variants:
        t0 = time.perf_counter()
        model = load_model(spec_for(name, folder, dtype, lexical), folder)
        load_s = time.perf_counter() - t0
        rate, outs = embedsvc_run(model, texts, rounds)
        label = dtype if lexical else f"{dtype}, no lexical weights"
        outputs[label] = outs
        cos = float((unit(outs[0].pooled) * reference).sum(1).min())
        extra = ""
        if dtype == "auto":
            pairs = zip(outputs["float32"][1:], outs[1:], strict=True)
            worst = min(worst_cosine(a, b) for a, b in pairs)
            extra = f", every output vs embedsvc float32 {worst:.5f}"
        print(
            f"  embedsvc {label:25s} {rate:7.2f} inputs/s  dense min cos {cos:.5f}{extra}  "
            f"(load {load_s:.1f} s: {model.precision})",
            flush=True,
        )
        rows.append((f"embedsvc {label}", rate, cos, model.precision))
        del model
    base = rows[0][1]
    print(
        "  ratios to sentence-transformers fp32: "
        + ", ".join(f"{r[0]} {r[1] / base:.2f}x" for r in rows[1:])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=["bge-m3", "qwen3-0.6b", "both"], default="both")
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-openvino", action="store_true")
    args = ap.parse_args()
    print(f"CPU: {cpu_description()}", flush=True)
    texts = rag_mix(args.texts, seed=11, passage_words=(30, 120))
    shapes = ["bge-m3", "qwen3-0.6b"] if args.shape == "both" else [args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            build = build_m3 if name == "bge-m3" else build_qwen3
            folder = build(Path(tmp) / name)
            measure(name, folder, texts, args.rounds, not args.no_openvino)
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
