#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU: parity of torch fp16 and onnxruntime CUDA
# fp16 against fp32, and throughput against the offline fp16 limit. Not part of the tests.
#   bash bench/gpu.sh [--model NAME] [--seconds N]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Install embedsvc next to the CUDA torch already on the machine (no constraints file, so
# the CPU pin in constraints.txt does not apply), plus the GPU onnxruntime.
"$PY" -m pip install -q -e '.[onnx-gpu]'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/gpu_check.py "$@"
