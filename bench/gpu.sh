#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, not part of the tests:
#   bench/gpu_check.py  parity of torch fp16 (with and without CUDA graphs) and onnxruntime
#                       CUDA fp16 against fp32, time per pass, throughput against the
#                       offline fp16 limit
#   bench/gpu_serve.py  single-input short queries over HTTP (wrk) against that limit,
#                       --api-workers 1 and auto, each with and without CUDA graphs
#
#   bash bench/gpu.sh                          # bge-small-en-v1.5 (downloads it first)
#   MODEL=bge-base-en-v1.5 bash bench/gpu.sh
#   RANDOM_WEIGHTS=1 bash bench/gpu.sh         # the architecture with random weights:
#                                              # times the same, downloads nothing
#   SKIP_INSTALL=1 ...                         # embedsvc's packages are already there
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=${MODEL:-bge-small-en-v1.5}
if [ -z "${SKIP_INSTALL:-}" ]; then
    # Install embedsvc next to the CUDA torch already on the machine (no constraints file,
    # so the CPU pin in requirements/torch.txt does not apply), plus the GPU onnxruntime.
    "$PY" -m pip install -q -e '.[onnx-gpu,bench]'
fi
ARGS=(--model "$MODEL")
if [ -n "${RANDOM_WEIGHTS:-}" ]; then
    ARGS+=(--random-weights)
elif [ "$MODEL" != all-minilm-l6-v2 ]; then
    "$PY" -m embedsvc pull --models "$MODEL"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
"$PY" bench/gpu_check.py "${ARGS[@]}" --seconds 10 || status=$?
if command -v wrk >/dev/null; then
    "$PY" bench/gpu_serve.py "${ARGS[@]}" --api-workers 1,0 --no-graphs-too || status=$?
else
    echo "SKIP bench/gpu_serve.py: needs wrk (apt-get install wrk)"
fi
exit "$status"
