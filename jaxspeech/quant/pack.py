"""Dense bit packing of b-bit codes (b in 1..8) into bytes, and exact unpacking.

Layout: a little-endian bit stream. Code ``i`` occupies stream bits ``[b*i, b*i + b)`` (its least
significant bit first) and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. ``n`` codes take
exactly ``ceil(n * b / 8)`` bytes -- 3-bit codes really take 3 bits (8 codes in 3 bytes), nothing
is padded to a power of two.

Vectorized numpy: codes are grouped ``g = 8 / gcd(8, b)`` at a time (e.g. 8 codes for b = 3),
each group is assembled into one uint64 word of ``g * b`` bits (a multiple of 8, at most 64) by
shifts, and the words are split into their ``g * b / 8`` little-endian bytes.
"""

from __future__ import annotations

import math

import numpy as np

PACK_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _group(bits: int) -> tuple[int, int]:
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be in {PACK_BITS}, got {bits!r}")
    codes_per_group = 8 // math.gcd(8, bits)
    return codes_per_group, codes_per_group * bits // 8


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` packed ``bits``-bit codes: ``ceil(count * bits / 8)``."""
    _group(bits)
    return -(-count * bits // 8)


def pack_codes(codes, bits: int) -> np.ndarray:
    """Pack integer codes in ``[0, 2**bits)`` (any shape, flattened C-order) into uint8 bytes."""
    g, nb = _group(bits)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{codes.min()}, {codes.max()}]")
    n = codes.size
    groups = -(-n // g)
    padded = np.zeros(groups * g, np.uint64)
    padded[:n] = codes
    shifts = np.arange(g, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(padded.reshape(groups, g) << shifts, axis=1)
    byte_shifts = np.arange(nb, dtype=np.uint64) * np.uint64(8)
    out = ((words[:, None] >> byte_shifts) & np.uint64(0xFF)).astype(np.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)]


def unpack_codes(packed, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: the first ``count`` codes as a flat uint8 array."""
    g, nb = _group(bits)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    need = packed_nbytes(count, bits)
    if packed.size != need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {packed.size}")
    groups = -(-count // g)
    full = np.zeros(groups * nb, np.uint64)
    full[:need] = packed
    byte_shifts = np.arange(nb, dtype=np.uint64) * np.uint64(8)
    words = np.bitwise_or.reduce(full.reshape(groups, nb) << byte_shifts, axis=1)
    shifts = np.arange(g, dtype=np.uint64) * np.uint64(bits)
    mask = np.uint64(2**bits - 1)
    codes = ((words[:, None] >> shifts) & mask).astype(np.uint8).reshape(-1)
    return codes[:count]
