#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, not part of the tests:
#   bench/gpu_check.py  parity of torch fp16 (with and without CUDA graphs) and onnxruntime
#                       CUDA fp16 against fp32, time per pass, throughput against the
#                       offline fp16 limit
#   bench/decoder.py    Qwen3-Embedding-0.6B's architecture: tokens/s of embedsvc against
#                       SentenceTransformer.encode, both in float16
#   bench/gpu_serve.py  single-input short queries over HTTP (wrk) against that limit,
#                       --api-workers 1 and auto, each with and without CUDA graphs; 32-input
#                       requests of the RAG mix against its offline limit
# Every figure goes into $RESULTS/gpu.json and gpu.md ($OUT on a lent GPU machine).
#
#   bash bench/gpu.sh                          # bge-small-en-v1.5 (downloads it first)
#   MODEL=bge-base-en-v1.5 bash bench/gpu.sh
#   RANDOM_WEIGHTS=1 bash bench/gpu.sh         # the architecture with random weights:
#                                              # times the same, downloads nothing
#   SKIP_INSTALL=1 ...                         # embedsvc's packages are already there
#   CARRY=.gpu-carry bash bench/gpu.sh         # no package index there: install the wheels
#                                              # bench/gpu_carry.sh gathered, run embedsvc
#                                              # from this tree, random weights, its wrk
#   CARRY_BULK=.gpu-carry-bulk ...             # pyarrow & co. for bench/bulk.py (on a machine
#                                              # that keeps them: a second run, 55 MB)
#   ONLY=bulk ...                              # that step alone (ONLY=main: all but it)
#   DEVICE=cpu CARRY=... bash bench/gpu.sh     # the same as a short dry run on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=${MODEL:-bge-small-en-v1.5}
DEVICE=${DEVICE:-cuda}
ARGS=(--model "$MODEL")
if [ -n "${CARRY:-}" ]; then
    # Nothing from the network: the carried wheels beside the image's torch and
    # sentence-transformers, embedsvc from this tree, the architecture with random weights.
    # (a second run on the same machine finds them installed already)
    [ -d "$CARRY/wheels" ] && "$PY" -m pip install -q --no-index --no-deps "$CARRY"/wheels/*.whl
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    [ -x "$CARRY/wrk/wrk" ] && export PATH="$PWD/$CARRY/wrk:$PATH"
    RANDOM_WEIGHTS=1
    ARGS+=(--tokenizer "$CARRY/tokenizer")
elif [ -z "${SKIP_INSTALL:-}" ]; then
    # Install embedsvc next to the CUDA torch already on the machine (no constraints file,
    # so the CPU pin in requirements/torch.txt does not apply), plus the GPU onnxruntime.
    "$PY" -m pip install -q -e '.[onnx-gpu,bench]'
fi
if [ -n "${RANDOM_WEIGHTS:-}" ]; then
    ARGS+=(--random-weights)
elif [ "$MODEL" != all-minilm-l6-v2 ]; then
    "$PY" -m embedsvc pull --models "$MODEL"
fi
# Every figure into one JSON and a markdown table ($OUT on a lent GPU machine comes back).
RESULTS=${RESULTS:-${OUT:-gpu-results}}
REPORT=(--report "$RESULTS/gpu.json")
ONLY=${ONLY:-}
[ "$ONLY" = bulk ] || rm -f "$RESULTS/gpu.json" "$RESULTS/gpu.md"
main() { [ "$ONLY" != bulk ]; }
bulk() { [ "$ONLY" != main ]; }
CHECK=(--seconds 10)
SERVE=(--api-workers 1,0 --no-graphs-too)
if [ "$DEVICE" = cpu ]; then  # a dry run: every step, briefly
    CHECK=(--device cpu --quick --texts 256 --seconds 0.5)
    SERVE=(--device cpu --api-workers 1 --seconds 2 --connections 16 --threads 1 --texts 256)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
if main; then
    "$PY" bench/gpu_check.py "${ARGS[@]}" "${CHECK[@]}" "${REPORT[@]}" || status=$?
fi
# embedsvc embed on 200,000 rows against encode, and the cost of a million at USD_PER_HOUR
# (default: 3.50, the top of the H100 / bottom of the H200 SXM5 on-demand range at
# specialty clouds in mercatus-ai.com/blog/cloud-gpu-pricing, May 2026).
USD=${USD_PER_HOUR:-3.50}
BULK=(--device cuda --rows 200000 --batch-sizes 128,256,512 --usd-per-hour "$USD")
[ "$DEVICE" = cpu ] && BULK=(--rows 64 --batch-sizes 32 --usd-per-hour "$USD")
[ -n "${RANDOM_WEIGHTS:-}" ] && BULK+=("${ARGS[@]:2}")
if [ -n "${CARRY_BULK:-}" ] && bulk; then
    "$PY" -m pip install -q --no-index --no-deps "$CARRY_BULK"/wheels/*.whl
fi
if ! bulk; then
    :
elif "$PY" -c "import pyarrow" 2>/dev/null; then
    "$PY" bench/bulk.py --model "$MODEL" "${BULK[@]}" "${REPORT[@]}" || status=$?
else
    echo "SKIP bench/bulk.py: needs pyarrow (CARRY_BULK=.gpu-carry-bulk, from bench/gpu_carry.sh)"
fi
DECODER=(--device cuda --texts 2048 --seconds 20)
[ "$DEVICE" = cpu ] && DECODER=(--layers 2 --hidden 64 --texts 32 --seconds 1)
if main; then
    "$PY" bench/decoder.py "${DECODER[@]}" "${REPORT[@]}" || status=$?
fi
if ! main; then
    :
elif command -v wrk >/dev/null && { wrk --version 2>&1 || true; } | grep -q "^wrk "; then
    "$PY" bench/gpu_serve.py "${ARGS[@]}" "${SERVE[@]}" "${REPORT[@]}" || status=$?
else
    echo "SKIP bench/gpu_serve.py: needs a wrk that runs here (apt-get install wrk)"
fi
[ -f "$RESULTS/gpu.md" ] && cat "$RESULTS/gpu.md"
exit "$status"
