"""A BERT / XLM-RoBERTa encoder and sentence-transformers pooling in plain torch.

Most embedding models (MiniLM, BGE, E5, multilingual-E5, bge-m3) are a BERT-family encoder
followed by pooling. Loading them through sentence-transformers imports transformers'
model zoo, scikit-learn and more: seconds of start-up before the first forward pass. This
module computes the same function with torch alone, from the folder's config.json and
safetensors weights (the same parameter names, loaded strictly), so a replica is ready in
a fraction of that.

`plan(folder)` says whether a model folder is one this module computes exactly: a
Transformer module of a supported architecture, then Pooling by cls / mean / lasttoken,
then an optional Normalize (which the engine applies itself). Anything else — Dense
layers, custom code, other architectures, extra tokenizer or model arguments — returns
None and the caller loads the model through sentence-transformers. The tests compare
both paths.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHITECTURES = ("bert", "xlm-roberta", "roberta")
ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh")
POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class Plan:
    """What loading a folder without sentence-transformers needs."""

    config: dict[str, Any]
    weights: list[Path]
    pooling: str
    max_seq_length: int | None
    dimension: int


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def plan(folder: Path) -> Plan | None:
    """A Plan when `folder` holds a model this module computes exactly, else None."""
    modules = read_json(folder / "modules.json")
    if not isinstance(modules, list) or not modules:
        return None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    encoder = _encoder_plan(folder, modules[0])
    if encoder is None:
        return None
    pooling_cfg = read_json(folder / str(modules[1].get("path", "")) / "config.json")
    if not isinstance(pooling_cfg, dict) or not pooling_cfg.get("include_prompt", True):
        return None
    on = [k for k, v in pooling_cfg.items() if k.startswith("pooling_mode") and v]
    if len(on) != 1 or on[0] not in POOLING_FLAGS:
        return None
    if pooling_cfg.get("word_embedding_dimension") != encoder.dimension:
        return None
    return dataclasses.replace(encoder, pooling=POOLING_FLAGS[on[0]])


def encoder_plan(folder: Path) -> Plan | None:
    """A Plan of the transformer of `folder` alone, whatever modules follow it (a ColBERT
    model's projection), when this module computes it exactly; pooling "none"."""
    modules = read_json(folder / "modules.json")
    if not isinstance(modules, list) or not modules or not isinstance(modules[0], dict):
        return None
    if str(modules[0].get("type", "")).rsplit(".", 1)[-1] != "Transformer":
        return None
    return _encoder_plan(folder, modules[0])


def _encoder_plan(folder: Path, transformer: dict[str, Any]) -> Plan | None:
    if transformer.get("path", "") != "":
        return None
    config = read_json(folder / "config.json")
    if not isinstance(config, dict) or config.get("model_type") not in ARCHITECTURES:
        return None
    if config.get("auto_map") or config.get("position_embedding_type", "absolute") != "absolute":
        return None
    if config.get("hidden_act", "gelu") not in ACTIVATIONS or config.get("is_decoder"):
        return None
    sbert = read_json(folder / "sentence_bert_config.json") or {}
    if not isinstance(sbert, dict) or set(sbert) - {"max_seq_length", "do_lower_case"}:
        return None  # model_args, tokenizer_args, config_args: leave them to the library
    if sbert.get("do_lower_case") and not _tokenizer_lowercases(folder):
        return None  # sentence-transformers lower-cases the text itself for such a model
    dimension = config.get("hidden_size")
    if not isinstance(dimension, int):
        return None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights or not (folder / "tokenizer.json").is_file():
        return None
    return Plan(
        config=config,
        weights=weights,
        pooling="none",
        max_seq_length=sbert.get("max_seq_length"),
        dimension=dimension,
    )


def _tokenizer_lowercases(folder: Path) -> bool:
    """Whether tokenizer.json's normalizer lower-cases (BGE's uncased BERT tokenizer: then
    sentence-transformers' do_lower_case changes nothing)."""
    tokenizer = read_json(folder / "tokenizer.json")
    norm = tokenizer.get("normalizer") if isinstance(tokenizer, dict) else None
    steps = (norm.get("normalizers") or [norm]) if isinstance(norm, dict) else []
    return any(
        isinstance(n, dict)
        and (
            n.get("type") == "Lowercase"
            or (n.get("type") == "BertNormalizer" and n.get("lowercase"))
        )
        for n in steps
    )


def build(p: Plan, device: str, dtype: str) -> Any:
    """The encoder with its weights, in eval mode, on `device` in `dtype`; raises
    ValueError when the weights do not match the architecture exactly."""
    import torch
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for f in p.weights:
        state.update(load_file(str(f)))
    prefixes = {k.split(".", 1)[0] for k in state}
    for prefix in ("bert", "roberta", "model"):
        if prefix in prefixes and "embeddings" not in prefixes:
            state = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(prefix + ".")}
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    state.pop("embeddings.position_ids", None)
    state.pop("embeddings.token_type_ids", None)
    model = _encoder_class()(p.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match: missing {missing[:3]}, extra {unexpected[:3]}")
    model.fuse()
    model.packed = device == "cpu"
    if dtype == "bfloat16" and device == "cpu":
        # On a CPU, bfloat16 is for its matrix units (AVX512-BF16, AMX): the linear
        # layers' weights and inputs in bfloat16, while the embeddings, every LayerNorm,
        # the softmax and the residual stream stay float32 (as torch's autocast and
        # OpenVINO run bf16). Rounding everything to bfloat16 lost 2.5x more cosine on the
        # shortest texts for no more speed.
        for layer in model.encoder.layer:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(dtype=torch.bfloat16)
            layer.compute = torch.bfloat16
        return model.to(device=device).eval()
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


_ENCODER: Any = None
# Sequences up to this many positions take plain-kernel attention on a CPU (see `attend`);
# measured on a 2-core AVX2 CPU: the fused kernel won from about 64-128 positions.
SHORT_ATTENTION = 64


def _encoder_class() -> Any:
    """The torch module classes, defined on first use (torch is imported lazily: a
    front-end process or `embedsvc --help` never pays for it). About 200 lines (a reason,
    against the 80-line rule): classes that subclass torch's cannot be defined at module
    level without importing torch there."""
    global _ENCODER
    if _ENCODER is not None:
        return _ENCODER
    import torch
    import torch.nn.functional as F
    from torch import nn

    def activation(name: str) -> Any:
        if name == "relu":
            return F.relu
        if name == "gelu":
            return F.gelu
        return lambda x: F.gelu(x, approximate="tanh")

    class Embeddings(nn.Module):
        def __init__(self, c: dict[str, Any]) -> None:
            super().__init__()
            h = c["hidden_size"]
            self.word_embeddings = nn.Embedding(c["vocab_size"], h)
            self.position_embeddings = nn.Embedding(c["max_position_embeddings"], h)
            self.token_type_embeddings = nn.Embedding(c.get("type_vocab_size", 2), h)
            self.LayerNorm = nn.LayerNorm(h, eps=c.get("layer_norm_eps", 1e-12))
            # RoBERTa family: positions count real tokens from padding_idx + 1.
            self.roberta = c["model_type"] != "bert"
            self.pad = int(c.get("pad_token_id") or 0)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            if self.roberta:
                real = (ids != self.pad).long()
                positions = torch.cumsum(real, dim=1) * real + self.pad
            else:
                positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
            x = self.word_embeddings(ids) + self.position_embeddings(positions)
            x = x + self.token_type_embeddings.weight[0]
            return self.LayerNorm(x)

        def packed(self, ids: torch.Tensor, real: torch.Tensor, s: int) -> torch.Tensor:
            """The embeddings of the real tokens only ([n, hidden]; `real`: their
            positions in the flattened batch of `s` columns)."""
            if self.roberta:
                pad = (ids != self.pad).long()
                positions = (torch.cumsum(pad, dim=1) * pad + self.pad).reshape(-1)
                positions = positions.index_select(0, real)
            else:
                positions = real.remainder(s)
            x = self.word_embeddings(ids.reshape(-1).index_select(0, real))
            x = x + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
            return self.LayerNorm(x)

    class SelfAttention(nn.Module):
        def __init__(self, h: int) -> None:
            super().__init__()
            self.query = nn.Linear(h, h)
            self.key = nn.Linear(h, h)
            self.value = nn.Linear(h, h)

    class Dense(nn.Module):
        def __init__(self, n_in: int, n_out: int, eps: float | None) -> None:
            super().__init__()
            self.dense = nn.Linear(n_in, n_out)
            if eps is not None:
                self.LayerNorm = nn.LayerNorm(n_out, eps=eps)

    class Attention(nn.Module):
        def __init__(self, h: int, eps: float) -> None:
            super().__init__()
            self.self = SelfAttention(h)
            self.output = Dense(h, h, eps)

    @torch.jit.script
    def attend(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keep: torch.Tensor,
        bias: torch.Tensor,
        short: int,
    ) -> torch.Tensor:
        """Attention over [batch, heads, seq, head_dim]. Up to `short` positions as three
        plain kernels (scores, softmax, weighted sum): for short sequences on a CPU they
        take 0.6-0.8x the time of the fused kernel on one thread, 0.2-0.6x on two (it
        splits the work poorly when each sequence is small); longer ones, where the fused
        kernel wins, go to it. Scripted so that a trace keeps the branch."""
        if q.shape[2] <= short:  # softmax in float32 (`bias`'s dtype) whatever q's
            scores = torch.matmul(q, k.transpose(-1, -2)).to(bias.dtype)
            weights = scores.mul_(q.shape[-1] ** -0.5).add_(bias).softmax(-1)
            return torch.matmul(weights.to(v.dtype), v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    class Layer(nn.Module):
        def __init__(self, c: dict[str, Any]) -> None:
            super().__init__()
            h, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-12)
            self.heads = c["num_attention_heads"]
            self.attention = Attention(h, eps)
            self.intermediate = Dense(h, c["intermediate_size"], None)
            self.output = Dense(c["intermediate_size"], h, eps)
            self.act = activation(c.get("hidden_act", "gelu"))
            self.qkv: nn.Linear | None = None
            # The linear layers' dtype where it differs from the states' (see `build`).
            self.compute: torch.dtype | None = None

        def low(self, x: torch.Tensor) -> torch.Tensor:
            return x if self.compute is None else x.to(self.compute)

        def fuse(self) -> None:
            """Query, key and value as one [3 * hidden, hidden] linear layer (one matmul
            instead of three and a concatenation); the three loaded layers are dropped."""
            sa = self.attention.self
            h = sa.query.in_features
            self.qkv = nn.Linear(h, 3 * h)
            with torch.no_grad():
                self.qkv.weight.copy_(torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]))
                self.qkv.bias.copy_(torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]))
            del self.attention.self

        def forward_packed(
            self,
            x: torch.Tensor,
            real: torch.Tensor,
            slot: torch.Tensor,
            b: int,
            s: int,
            keep: torch.Tensor,
            bias: torch.Tensor,
        ) -> torch.Tensor:
            """`x`: the real tokens' states [n, hidden] (positions `real` of the flattened
            batch; `slot`: each position's row of `x`). Only attention sees the padded
            layout, gathered from `x` (a padded position gets a copy of a real token,
            which the mask hides); the dense layers, most of the work, run on real tokens
            alone."""
            assert self.qkv is not None
            h = x.shape[-1]
            full = self.qkv(self.low(x)).index_select(0, slot)
            q, k, v = full.view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
            a = attend(q, k, v, keep, bias, SHORT_ATTENTION)
            a = a.transpose(1, 2).reshape(b * s, h).index_select(0, real)
            out = self.attention.output
            x = out.LayerNorm(out.dense(a).to(x.dtype) + x)
            y = self.output.dense(self.act(self.intermediate.dense(self.low(x))))
            return self.output.LayerNorm(y.to(x.dtype) + x)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            assert self.qkv is not None
            b, s, h = x.shape
            qkv = self.qkv(self.low(x))
            q, k, v = qkv.view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            a = a.transpose(1, 2).reshape(b, s, h)
            out = self.attention.output
            x = out.LayerNorm(out.dense(a).to(x.dtype) + x)
            y = self.output.dense(self.act(self.intermediate.dense(self.low(x))))
            return self.output.LayerNorm(y.to(x.dtype) + x)

    class Encoder(nn.Module):
        def __init__(self, c: dict[str, Any]) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))

    class BertEncoder(nn.Module):
        """input_ids, attention_mask [batch, seq] -> token states [batch, seq, hidden]
        (when `packed`, a padded position holds a copy of a real token's state: pooling
        weights it 0)."""

        def __init__(self, c: dict[str, Any]) -> None:
            super().__init__()
            self.embeddings = Embeddings(c)
            self.encoder = Encoder(c)
            # Padded positions skip the dense layers (Layer.forward_packed): a batch of
            # mixed lengths costs about its real tokens. Set for CPUs, where the row
            # gathers are cheap; elsewhere every position is computed.
            self.packed = False

        def fuse(self) -> None:
            for layer in self.encoder.layer:
                layer.fuse()  # type: ignore[operator]

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            keep = mask.bool()[:, None, None, :]  # keys a query may attend to
            if not self.packed:
                x = self.embeddings(ids)
                for layer in self.encoder.layer:
                    x = layer(x, keep)
                return x
            b, s = ids.shape
            flat = mask.reshape(-1)
            real = flat.nonzero().squeeze(1)
            # Each position's row among the real tokens; a padded one gets its row's last
            # real token (a gather: scattering into zeros took 5x as long).
            slot = flat.cumsum(0).sub_(1).clamp_(min=0)
            y = self.embeddings.packed(ids, real, s)
            bias = torch.zeros(b, 1, 1, s, dtype=y.dtype, device=y.device)
            bias.masked_fill_(keep.logical_not(), torch.finfo(y.dtype).min)
            for layer in self.encoder.layer:
                y = layer.forward_packed(y, real, slot, b, s, keep, bias)  # type: ignore[operator]
            return y.index_select(0, slot).view(b, s, y.shape[-1])

    _ENCODER = BertEncoder
    return _ENCODER


def pooled(encoder: Any, mode: str) -> Any:
    """`encoder` and pooling as one module: (input_ids, attention_mask) -> float32 sentence
    vectors, so that a traced forward pass is a single call from Python."""
    from torch import nn

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, ids: Any, mask: Any) -> Any:
            return pool(self.encoder(ids, mask), mask, mode).float()

    return Pooled()


def pool(states: Any, mask: Any, mode: str) -> Any:
    """sentence-transformers' Pooling for one mode, on torch tensors (right padding)."""
    import torch

    if mode == "cls":
        return states[:, 0]
    if mode == "mean":
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    last = mask.sum(1) - 1  # lasttoken
    return states[torch.arange(states.shape[0], device=states.device), last]
