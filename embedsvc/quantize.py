"""The int8 recipe for CPU: two exact graph rewrites, then dynamic int8 quantization.

Measured on all-MiniLM-L6-v2 (bench/backends.py; README "ONNX"): quantizing every weight
matmul with one activation scale per tensor is the fastest int8 graph but moves vectors too
far (worst cosine vs torch 0.976-0.984): a few tokens, [CLS] above all, carry activations
4-7x larger than the rest and set the scale for the whole batch. So before quantizing:

1. `unpack_attention`: onnxruntime's fused `Attention` keeps the packed Q/K/V weight inside
   an op the quantizer skips; it becomes MatMul + Split + `MultiHeadAttention`, so the
   Q/K/V projection (a quarter of the matmul work) is quantized too.
2. `scale_per_token`: each weight matmul computes `((x / r) @ W) * r` with r the largest
   magnitude of each token's row, so the per-tensor activation scale becomes in effect a
   per-token one (worst cosine 0.991-0.994 instead of 0.976-0.984, for about a tenth of the
   int8 graph's time).

Both rewrites leave the fp32 graph's outputs unchanged (tests/test_onnx.py checks this).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MS = "com.microsoft"


def quantize_int8(fp32: Path, target: Path) -> None:
    """Write an int8 version of the fp32 graph at `fp32` to `target`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    unpacked = unpack_attention(model)
    weight_matmuls = scale_per_token(model)
    prepared = target.with_name(target.stem + ".prepared.onnx")
    onnx.save(model, str(prepared))
    try:
        quantize_dynamic(
            str(prepared),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=weight_matmuls,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        prepared.unlink(missing_ok=True)
    log.info(
        "int8: %d attention ops unpacked, %d weight matmuls quantized with per-token scaling",
        unpacked, len(weight_matmuls),
    )  # fmt: skip


def _weights(model: Any) -> dict[str, Any]:
    return {i.name: i for i in model.graph.initializer}


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def unpack_attention(model: Any) -> int:
    """Attention(x, W, b, attention_bias=m) -> Split(x @ W) -> MultiHeadAttention(q, k, v, b,
    attention_bias=m), where W is an initializer or a Concat of initializers. Attention ops
    with a mask index, past state or unequal Q/K/V sizes are left as they are."""
    import numpy as np
    from onnx import helper, numpy_helper

    weights = _weights(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes: list[Any] = []
    concats: list[Any] = []
    count = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Attention" or node.domain != _MS:
            nodes.append(node)
            continue
        attrs = _attrs(node)
        inputs = list(node.input) + [""] * (7 - len(node.input))
        packed, parts = _packed_weight(inputs[1], weights, producer)
        sizes = attrs.get("qkv_hidden_sizes") or []
        simple = (
            packed is not None
            and not inputs[3]  # mask_index
            and not inputs[4]  # past
            and not inputs[6]  # past_sequence_length
            and not attrs.get("unidirectional")
            and not attrs.get("do_rotary")
            and (not sizes or len(set(sizes)) == 1)
            and packed.shape[1] % 3 == 0
        )
        if not simple or packed is None:
            nodes.append(node)
            continue
        name = node.name or f"attention_{i}"
        hidden = packed.shape[1] // 3
        w_name, split_name, qkv = f"{name}/qkv_weight", f"{name}/qkv_split", f"{name}/qkv"
        model.graph.initializer.append(numpy_helper.from_array(packed, w_name))
        model.graph.initializer.append(
            numpy_helper.from_array(np.array([hidden] * 3, dtype=np.int64), split_name)
        )
        q, k, v = (f"{name}/{p}" for p in "qkv")
        mha_attrs = {k_: attrs[k_] for k_ in ("num_heads", "scale", "mask_filter_value")
                     if k_ in attrs}  # fmt: skip
        nodes += [
            helper.make_node("MatMul", [inputs[0], w_name], [qkv], name=f"{name}/MatMul"),
            helper.make_node("Split", [qkv, split_name], [q, k, v], axis=-1, name=f"{name}/Split"),
            helper.make_node(
                "MultiHeadAttention", [q, k, v, inputs[2], "", inputs[5]], list(node.output),
                name=f"{name}/MultiHeadAttention", domain=_MS, **mha_attrs,
            ),
        ]  # fmt: skip
        concats += parts
        count += 1
    if count:
        outputs = {o.name for o in model.graph.output}
        used = {x for n in nodes for x in n.input} | outputs
        unused = [c for c in concats if not set(c.output) & used]
        nodes = [n for n in nodes if not any(n is c for c in unused)]
        used = {x for n in nodes for x in n.input} | outputs
        keep = [w for w in model.graph.initializer if w.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return count


def _packed_weight(
    name: str, weights: dict[str, Any], producer: dict[str, Any]
) -> tuple[Any, list[Any]]:
    """The packed Q/K/V weight as an array, and the Concat node that built it (if any)."""
    import numpy as np
    from onnx import numpy_helper

    if name in weights:
        return numpy_helper.to_array(weights[name]), []
    concat = producer.get(name)
    if concat is None or concat.op_type != "Concat" or _attrs(concat).get("axis") not in (1, -1):
        return None, []
    if not all(x in weights for x in concat.input):
        return None, []
    arrays = [numpy_helper.to_array(weights[x]) for x in concat.input]
    if any(a.ndim != 2 for a in arrays):
        return None, []
    return np.concatenate(arrays, axis=1), [concat]


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
