"""Bit packing of integer codes (qkd_jax.quant.export.packing) against an independent bit loop."""

from __future__ import annotations

import numpy as np
import pytest

from qkd_jax.quant.export.packing import pack_codes, packed_nbytes, unpack_codes


def _reference_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """The documented layout written as a plain loop: bit t of code j -> stream bit j*bits + t,
    stream bit i -> bit i % 8 of byte i // 8."""
    out = np.zeros((len(codes) * bits + 7) // 8, np.uint8)
    for j, c in enumerate(codes):
        for t in range(bits):
            if (int(c) >> t) & 1:
                i = j * bits + t
                out[i // 8] |= 1 << (i % 8)
    return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 3, 7, 8, 13, 64, 101])
def test_round_trip_and_layout(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(0, 2**bits, size=count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (packed_nbytes(count, bits),)
    assert packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(packed, _reference_pack(codes, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_power_of_two_widths_share_bytes_in_order(bits):
    per_byte = 8 // bits
    codes = np.arange(per_byte) % 2**bits
    expected = sum(int(c) << (bits * j) for j, c in enumerate(codes))
    assert pack_codes(codes, bits).tolist() == [expected]


def test_multidimensional_codes_pack_in_c_order():
    codes = np.arange(24).reshape(2, 3, 4) % 8
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, 3), 3, 24), codes.reshape(-1))


def test_extreme_codes_round_trip():
    for bits in range(1, 9):
        codes = np.array([0, 2**bits - 1] * 5, np.uint8)
        np.testing.assert_array_equal(unpack_codes(pack_codes(codes, bits), bits, codes.size), codes)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_codes(np.array([4]), 2)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_codes(np.array([-1]), 2)
    with pytest.raises(ValueError, match="integers"):
        pack_codes(np.array([0.5]), 2)
    for bad in (0, 9, True, 2.0):
        with pytest.raises(ValueError, match="bits"):
            pack_codes(np.array([0]), bad)
    packed = pack_codes(np.array([1, 2, 3]), 3)  # 9 bits -> 2 bytes
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_codes(packed[:1], 3, 3)
    damaged = packed.copy()
    damaged[-1] |= 0x80  # a padding bit
    with pytest.raises(ValueError, match="padding"):
        unpack_codes(damaged, 3, 3)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(packed.astype(np.int16), 3, 3)
