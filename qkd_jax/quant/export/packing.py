"""Bit packing of integer codes into uint8 words.

Layout ("bitstream_le"): the codes c_0, c_1, ... of `bits` bits each are concatenated into one
little-endian bit stream -- bit t of code j is stream bit j * bits + t, and stream bit i is
bit (i % 8) of byte i // 8. For 1, 2 and 4 bits this is the usual layout (code j sits in byte
j * bits // 8 at bit offset j * bits % 8, lowest bits first); for 3 bits a code may straddle two
bytes. The last byte is zero-padded; `unpack_codes` rejects non-zero padding (a sign of a
damaged or misread file). A stream of `count` codes takes ceil(count * bits / 8) bytes.
"""

from __future__ import annotations

import numpy as np

PACKING = "bitstream_le"
UNPACKED = "none"


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return int(bits)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by `count` codes of `bits` bits: ceil(count * bits / 8)."""
    bits = _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (int(count) * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs non-negative integer codes < 2**bits (any shape, flattened in C order) into uint8."""
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    flat = codes.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits; got [{flat.min()}, {flat.max()}]")
    if bits == 8:
        return flat.astype(np.uint8)
    planes = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8)  # (n, bits), LSB first
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_codes`: `count` codes as a flat uint8 array.

    Raises ValueError when the byte count does not match or padding bits are set.
    """
    bits = _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 array, got {packed.dtype} of shape {packed.shape}")
    expected = packed_nbytes(count, bits)
    if packed.size != expected:
        raise ValueError(f"{count} codes of {bits} bits take {expected} bytes, got {packed.size}")
    if bits == 8:
        return packed.copy()
    stream = np.unpackbits(packed, bitorder="little")
    if stream[count * bits:].any():
        raise ValueError("non-zero padding bits after the last code: the packed data is damaged")
    planes = stream[: count * bits].reshape(count, bits).astype(np.uint16)
    return (planes << np.arange(bits, dtype=np.uint16)).sum(axis=1).astype(np.uint8)
