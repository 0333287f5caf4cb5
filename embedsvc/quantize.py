"""The int8 recipe for CPU: two graph rewrites, then dynamic int8 quantization.

Measured on all-MiniLM-L6-v2 (bench/backends.py; docs/benchmarks.md): quantizing every weight
matmul with one activation scale per tensor is fast but moves vectors too far (worst cosine vs
torch 0.976-0.984): a few tokens, [CLS] above all, carry activations 4-7x larger than the rest
and set the quantization step for the whole batch. So before quantizing:

1. `attention_with_padding_mask`: onnxruntime's fused `Attention` gets its packed Q/K/V weight
   as one initializer and the padding mask as `mask_index` instead of an additive bias, the
   form the quantizer turns into `QAttention` (int8 Q/K/V projection, fused attention). Kept
   only when the fp32 graph still gives the same output on a padded probe batch, so a model
   whose attention bias is more than padding keeps fp32 attention.
2. `scale_per_token`: every other weight matmul computes `((x / r) @ W) * r` with r the
   largest magnitude of each token's row, so the per-tensor activation scale becomes in effect
   a per-token one (worst cosine 0.991-0.995 instead of 0.976-0.984).

Both rewrites leave the fp32 graph's outputs unchanged (tests/api/test_onnx.py checks this).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MS = "com.microsoft"
MASK_INPUT = "attention_mask"


def quantize_int8(fp32: Path, target: Path) -> None:
    """Write an int8 version of the fp32 graph at `fp32` to `target`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    attention = attention_with_padding_mask(model)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        if attention:
            onnx.save(model, str(prepared))
            diff = max_difference(fp32, prepared)
            if diff > 1e-3:
                log.warning(
                    "int8: attention keeps fp32 (its mask is not only padding: the "
                    "rewrite moved outputs by %.3g)",
                    diff,
                )
                model, attention = onnx.load(str(fp32)), []
        matmuls = scale_per_token(model)
        onnx.save(model, str(prepared))
        quantize_dynamic(
            str(prepared),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=attention + matmuls,
            extra_options={"MatMulConstBOnly": True},
        )
    log.info(
        "int8: %d attention ops, %d weight matmuls with per-token scaling",
        len(attention),
        len(matmuls),
    )


def max_difference(a: Path, b: Path) -> float:
    """Largest output difference of two graphs on a padded probe batch (unpadded positions)."""
    import numpy as np
    import onnxruntime as ort

    ids = np.random.default_rng(0).integers(100, 1000, (3, 24))
    mask = np.ones_like(ids)
    mask[1, 13:] = 0
    mask[2, 4:] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    out = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for p in (a, b)
    ]
    return float(np.abs(out[0] - out[1])[mask.astype(bool)].max())


def _weights(model: Any) -> dict[str, Any]:
    return {i.name: i for i in model.graph.initializer}


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def attention_with_padding_mask(model: Any) -> list[str]:
    """Rewrite each Attention(x, W, b, attention_bias=...) whose W is an initializer or a
    Concat of initializers into Attention(x, W', b, mask_index=int32(attention_mask)); return
    the names of the rewritten nodes. Ops without a bias, with past state, rotary embedding,
    unequal Q/K/V sizes or a mask index already are left alone."""
    from onnx import TensorProto, helper, numpy_helper

    if MASK_INPUT not in {i.name for i in model.graph.input}:
        return []
    weights = _weights(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    mask = f"{MASK_INPUT}/int32"
    nodes: list[Any] = [
        helper.make_node("Cast", [MASK_INPUT], [mask], to=TensorProto.INT32, name=f"{mask}/Cast")
    ]
    names: list[str] = []
    for i, node in enumerate(model.graph.node):
        attrs = _attrs(node)
        inputs = list(node.input) + [""] * (7 - len(node.input))
        packed = None
        if node.op_type == "Attention" and node.domain == _MS:
            packed = _packed_weight(inputs[1], weights, producer)
        sizes = attrs.get("qkv_hidden_sizes") or []
        if (
            packed is None
            or not inputs[2]  # QAttention needs the bias
            or any(inputs[3:5])
            or inputs[6]  # mask_index, past, past_sequence_length
            or attrs.get("unidirectional")
            or attrs.get("do_rotary")
            or len(set(sizes)) > 1
        ):
            nodes.append(node)
            continue
        name = node.name or f"attention_{i}"
        model.graph.initializer.append(numpy_helper.from_array(packed, f"{name}/qkv_weight"))
        kept = {k: v for k, v in attrs.items() if k in ("num_heads", "scale", "mask_filter_value")}
        nodes.append(
            helper.make_node(
                "Attention",
                [inputs[0], f"{name}/qkv_weight", inputs[2], mask],
                list(node.output),
                name=name,
                domain=_MS,
                **kept,
            )
        )
        names.append(name)
    if names:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _drop_unused(model)
    return names


def _drop_unused(model: Any) -> None:
    """Remove nodes and initializers nothing reads any more (e.g. the old mask and Concats)."""
    needed = {o.name for o in model.graph.output}
    keep: list[Any] = []
    for node in reversed(model.graph.node):
        if set(node.output) & needed:
            keep.append(node)
            needed.update(x for x in node.input if x)
    keep.reverse()
    del model.graph.node[:]
    model.graph.node.extend(keep)
    inits = [w for w in model.graph.initializer if w.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


def _packed_weight(name: str, weights: dict[str, Any], producer: dict[str, Any]) -> Any:
    """The packed Q/K/V weight as an array, from an initializer or a Concat of them."""
    import numpy as np
    from onnx import numpy_helper

    if name in weights:
        return numpy_helper.to_array(weights[name])
    concat = producer.get(name)
    if concat is None or concat.op_type != "Concat" or _attrs(concat).get("axis") not in (1, -1):
        return None
    if not all(x in weights for x in concat.input):
        return None
    arrays = [numpy_helper.to_array(weights[x]) for x in concat.input]
    if any(a.ndim != 2 for a in arrays):
        return None
    return np.concatenate(arrays, axis=1)


def scale_per_token(model: Any) -> list[str]:
    """Rewrite every matmul by a 2-D fp32 weight as ((x / r) @ W) * r with r = max |x| over
    each token's row; return the names of those matmuls (the ones to quantize)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = _weights(model)
    axes, eps = "per_token/axes", "per_token/eps"
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
    model.graph.initializer.append(numpy_helper.from_array(np.array(1e-6, np.float32), eps))
    nodes: list[Any] = []
    names: list[str] = []
    for i, node in enumerate(model.graph.node):
        is_matmul = node.op_type == "MatMul" and len(node.input) == 2
        w = weights.get(node.input[1]) if is_matmul else None
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        node.name = node.name or f"matmul_{i}"
        p = f"{node.name}/per_token"
        x, y = node.input[0], node.output[0]
        nodes += [
            helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"),
            helper.make_node("ReduceMax", [f"{p}/abs", axes], [f"{p}/max"], keepdims=1,
                             name=f"{p}/ReduceMax"),
            helper.make_node("Max", [f"{p}/max", eps], [f"{p}/r"], name=f"{p}/Max"),
            helper.make_node("Div", [x, f"{p}/r"], [f"{p}/x"], name=f"{p}/Div"),
        ]  # fmt: skip
        node.input[0], node.output[0] = f"{p}/x", f"{p}/y"
        nodes.append(node)
        nodes.append(helper.make_node("Mul", [f"{p}/y", f"{p}/r"], [y], name=f"{p}/Mul"))
        names.append(node.name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return names
