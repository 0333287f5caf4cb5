"""Integer output (`encoding_format` int8 | uint8 | binary | ubinary), packed as
sentence-transformers' `quantize_embeddings` packs it.

- binary / ubinary: one sign bit per dimension (1 when the value is above 0), 8 per byte in
  dimension order (numpy's packbits); ubinary gives the bytes as 0..255, binary as -128..127
  (byte - 128). A 384-dimension vector becomes 48 numbers; compare them by Hamming distance.
- int8 / uint8: each dimension's calibration range (engine/calibration.py, one per served
  size) in 256 steps, rounded down; uint8 gives 0..255, int8 -128..127. Unlike
  `quantize_embeddings`, a value outside the range is clipped to its end instead of wrapping
  around.
"""

from __future__ import annotations

import numpy as np

from embedsvc.errors import ValidationError

INTEGER_FORMATS = ("int8", "uint8", "binary", "ubinary")
Calibration = dict[int, tuple[list[float], list[float]]]


def quantize(vectors: np.ndarray, fmt: str, calibration: Calibration) -> np.ndarray:
    if fmt in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return packed if fmt == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    lo, hi = calibration[vectors.shape[1]]
    starts = np.asarray(lo, dtype=np.float32)
    steps = (np.asarray(hi, dtype=np.float32) - starts) / 255
    steps[steps == 0] = 1.0  # a constant dimension: every value maps to 0
    levels = np.clip(np.floor((vectors - starts) / steps), 0, 255)
    if fmt == "uint8":
        return levels.astype(np.uint8)
    return (levels - 128).astype(np.int8)


def check_format(fmt: str, normalize: bool) -> None:
    """int8/uint8 ranges are measured on normalized vectors."""
    if fmt in ("int8", "uint8") and not normalize:
        raise ValidationError(
            f"encoding_format {fmt} is calibrated on normalized vectors; "
            "drop normalize: false, or ask for float or binary",
            param="encoding_format",
        )
