"""Write the lock files in this folder from pyproject.toml: `make lock`.

Each lock pins every package one install needs, at exact versions with the sha256 of every
file the registry has for that version, for Python 3.11-3.13 on any platform (markers where
they differ). Installs read them with `pip install --require-hashes --no-deps -r LOCK`.

torch is left out of every lock: its build differs by machine (a CPU wheel on CPU hosts, a
CUDA wheel from PyTorch's index in the GPU image), so it is installed before the lock, at the
version `torch.txt` pins. The CUDA runtime packages that a CUDA torch brings with it
(nvidia-*, triton, cuda-*) are left to that torch install for the same reason; torch's other
dependencies (sympy, networkx, ...) are locked like any other package.

    dev.lock   make test / make bench: every extra the tests and benchmarks use
    cpu.lock   make serve and the CPU image: the server, onnxruntime, cl100k, OpenTelemetry
    gpu.lock   the GPU image: the server, onnxruntime-gpu, cl100k
    bulk.lock  the bulk image (embedsvc embed, Ray): cpu.lock's set with bulk and ray

Every lock after dev.lock is resolved with dev.lock as constraints, so a package has one
version in all of them. `make lock ARGS=--keep` keeps every version the locks already pin
where the new requirements allow it (a dependency added moves nothing else).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCKS = {
    "dev.lock": ["test", "bench"],
    "cpu.lock": ["onnx", "cl100k", "otel"],
    "gpu.lock": ["onnx-gpu", "cl100k", "otel"],
    "bulk.lock": ["onnx", "cl100k", "otel", "bulk", "ray"],
}
# Installed with torch, by torch's own index: never pinned here.
WITH_TORCH = re.compile(r"^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)$")
MIN_PYTHON = "3.11"


def compile_lock(
    uv: str, name: str, extras: list[str], constraints: Path | None, keep: bool = False
) -> None:
    out = HERE / name
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / name
        if keep and out.exists():
            raw.write_text(out.read_text())  # uv prefers the versions its output file pins
        cmd = [
            uv, "pip", "compile", str(ROOT / "pyproject.toml"),
            "--universal", "--python-version", MIN_PYTHON,
            "--generate-hashes", "--no-header", "--quiet",
            "--output-file", str(raw),
        ]  # fmt: skip
        for extra in extras:
            cmd += ["--extra", extra]
        if constraints is not None:
            cmd += ["--constraint", str(constraints)]
        subprocess.run(cmd, check=True, cwd=ROOT)
        kept = without_torch(raw.read_text())
    header = (
        f"# {name}: written by `make lock` (requirements/lock.py) from pyproject.toml,\n"
        f"# extras: {', '.join(extras)}. Do not edit; torch is pinned in requirements/torch.txt.\n"
    )
    out.write_text(header + kept)
    print(f"{out.relative_to(ROOT)}: {kept.count('==')} packages")


def without_torch(text: str) -> str:
    """The lock less the blocks (a requirement, its hashes, its `# via` lines) of torch
    and of the CUDA packages a CUDA torch installs."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    kept = []
    for block in blocks:
        name = re.split(r"[=<>!~ ;\[]", block[0], maxsplit=1)[0].lower()
        if not WITH_TORCH.match(name):
            kept.extend(block)
    return "\n".join(kept) + "\n"


def main() -> int:
    args = sys.argv[1:]
    keep = "--keep" in args
    uv = next((a for a in args if a != "--keep"), "uv")
    compile_lock(uv, "dev.lock", LOCKS["dev.lock"], None, keep)
    for name, extras in LOCKS.items():
        if name != "dev.lock":
            compile_lock(uv, name, extras, HERE / "dev.lock", keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
