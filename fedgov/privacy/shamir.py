"""Shamir reconstruction for the shares Flower's ``create_shares`` makes, fast and batched.

Flower's ``flwr.common.secure_aggregation.crypto.shamir`` pads a secret (PKCS#7, 16-byte blocks),
splits each 16-byte chunk with pycryptodome's ``Shamir.split`` (GF(2^128), irreducible
polynomial ``x^128 + x^7 + x^2 + x + 1``, an element's 16 bytes read big-endian with bit ``i``
the coefficient of ``x^i``), and lays a share out as ``<index: 4 bytes little-endian>`` followed
by the chunk shares in order. Its ``combine_shares`` rebuilds each chunk in pure Python
(pycryptodome's bit-by-bit ``_Element`` multiplication, one inverse per share) in a fresh thread
pool per secret: about 60 ms a secret, 20 s for the 342 secrets of a 342-node round.

Here, the same reconstruction: a secret chunk is ``sum_j lambda_j * y_j`` (Lagrange at 0,
``lambda_j = prod_{m != j} x_m / prod_{m != j} (x_j + x_m)``; addition is XOR), and
multiplying by the constant ``lambda_j`` is linear over GF(2), so it is a lookup in 16 tables of
256 entries (one per byte of ``y_j``) XORed together. The coefficients and tables are computed
once per distinct set of share indices (there are few: a caller that uses the lowest indices it
holds gets the same set for most secrets), and the chunks of every secret with that index set
are rebuilt together with one ``numpy`` gather and one XOR reduction (integer operations on one
thread: no BLAS, whose thread pool was seen to stall a small product for 30 ms on two cores once
Flower is imported). The results are byte-identical to Flower's ``combine_shares``
(``tests/unit/test_secagg_speed.py`` checks it against Flower).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from fedgov.errors import ShareError

__all__ = ["ShareError", "combine_shares", "combine_shares_many", "create_shares", "lagrange_at_zero", "share_index"]

_MASK128 = (1 << 128) - 1
_IRR = (1 << 128) | 0x87  # x^128 + x^7 + x^2 + x + 1, pycryptodome's _Element.irr_poly


def _reduce(z: int) -> int:
    """``z`` (a carry-less product, at most 255 bits) modulo the field polynomial."""
    while z >> 128:
        hi = z >> 128
        z = (z & _MASK128) ^ hi ^ (hi << 1) ^ (hi << 2) ^ (hi << 7)
    return z


def _clmul(a: int, b: int) -> int:
    """Carry-less product of two polynomials over GF(2) (unreduced)."""
    if a < b:
        a, b = b, a
    z = 0
    while b:
        if b & 1:
            z ^= a
        a <<= 1
        b >>= 1
    return z


def _gf_mul(a: int, b: int) -> int:
    return _reduce(_clmul(a, b))


def _gf_inv(a: int) -> int:
    """Inverse in GF(2^128) by the extended Euclidean algorithm (as pycryptodome's ``inverse``)."""
    if a == 0:
        raise ValueError("Inversion of zero")
    r0, r1 = a, _IRR
    s0, s1 = 1, 0
    while r1:
        q, r, d = 0, r0, r1.bit_length()
        while r.bit_length() >= d:
            sh = r.bit_length() - d
            q ^= 1 << sh
            r ^= r1 << sh
        r0, r1 = r1, r
        s0, s1 = s1, s0 ^ _clmul(q, s1)
    return _reduce(s0)


@lru_cache(maxsize=4096)
def lagrange_at_zero(indices: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange coefficients at 0 for shares at ``indices`` (distinct), as 128-bit integers:
    ``secret = XOR_j lambda_j * y_j`` in GF(2^128)."""
    if len(set(indices)) != len(indices):
        raise ValueError("Duplicate share")
    out = []
    for j, xj in enumerate(indices):
        num, den = 1, 1
        for m, xm in enumerate(indices):
            if m != j:
                num = _gf_mul(num, xm)
                den = _gf_mul(den, xj ^ xm)
        out.append(_gf_mul(num, _gf_inv(den)))
    return tuple(out)


@lru_cache(maxsize=16)
def _tables(indices: tuple[int, ...]) -> np.ndarray:
    """``(k * 16 * 256, 2)`` uint64 lookup tables: row ``(16 j + p) * 256 + v`` is
    ``lambda_j * (v << 8 (15 - p))`` as (high, low) 64-bit halves, ``p`` the byte's position in
    an element's 16 big-endian bytes; a chunk is rebuilt as the XOR of ``16 k`` rows."""
    basis = []
    for lam in lagrange_at_zero(indices):
        v = lam
        for _ in range(128):  # lambda * x^i, i = 0..127
            basis.append((v >> 64, v & 0xFFFFFFFFFFFFFFFF))
            v <<= 1
            if v >> 128:
                v ^= _IRR
    k = len(indices)
    # (k, 16 positions, 8 bits, 2 halves): position p holds the coefficients 8 (15 - p) .. + 7
    b = np.array(basis, dtype=np.uint64).reshape(k, 16, 8, 2)[:, ::-1]
    t = np.zeros((k, 16, 256, 2), dtype=np.uint64)
    for bit in range(8):  # entries v in [2^bit, 2^(bit+1)): the entry v - 2^bit XOR the bit's basis value
        t[:, :, 1 << bit : 2 << bit] = t[:, :, : 1 << bit] ^ b[:, :, bit, None, :]
    flat = t.reshape(k * 16 * 256, 2)
    flat.setflags(write=False)
    return flat


def share_index(share: bytes) -> int:
    """The index a Flower share carries (its first 4 bytes, little-endian)."""
    return int.from_bytes(share[:4], "little", signed=False)


def _unpad(padded: bytes) -> bytes:
    from Crypto.Util.Padding import unpad

    return unpad(padded, 16)


def combine_shares_many(share_lists: Sequence[Sequence[bytes]]) -> list[bytes]:
    """Rebuild many secrets, each from its own list of Flower shares (exactly as many as its
    threshold, like Flower's ``combine_shares``): byte-identical to ``[combine_shares(s) for s
    in share_lists]``. A list that does not combine (no shares, uneven or malformed lengths,
    duplicate indices, bad padding) raises :class:`ShareError` naming its position."""
    groups: dict[tuple[int, ...], list[tuple[int, int, bytes]]] = {}  # indices -> (position, chunks, chunk bytes k*c*16)
    for pos, shares in enumerate(share_lists):
        if not shares:
            raise ShareError(pos, "no shares")
        size = len(shares[0])
        if size < 20 or (size - 4) % 16 or any(len(s) != size for s in shares):
            raise ShareError(pos, "Failed to combine shares: malformed share lengths")
        order = sorted(range(len(shares)), key=lambda i: share_index(shares[i]))
        idx = tuple(share_index(shares[i]) for i in order)
        if any(a == b for a, b in zip(idx, idx[1:], strict=False)):
            raise ShareError(pos, "Duplicate share")
        groups.setdefault(idx, []).append((pos, (size - 4) // 16, b"".join(bytes(shares[i][4:]) for i in order)))
    out: list[bytes] = [b""] * len(share_lists)
    for idx, items in groups.items():
        k = len(idx)
        # rows: one per chunk of each secret; columns: share j's 16 bytes, for j in order
        ys = np.concatenate([
            np.frombuffer(data, dtype=np.uint8).reshape(k, c, 16).transpose(1, 0, 2).reshape(c, 16 * k) for _, c, data in items
        ])
        rows = np.arange(16 * k, dtype=np.int64) * 256 + ys  # (chunks, 16 k): the table row of each byte
        halves = np.bitwise_xor.reduce(_tables(idx)[rows], axis=1)  # (chunks, 2)
        chunks = halves.astype(">u8").tobytes()
        at = 0
        for pos, c, _ in items:
            padded = chunks[16 * at : 16 * (at + c)]
            at += c
            try:
                out[pos] = _unpad(padded)
            except ValueError:
                raise ShareError(pos, "Failed to combine shares") from None
    return out


def create_shares(secret: bytes, threshold: int, num: int, *, random_bytes: Callable[[int], bytes] = os.urandom) -> list[bytes]:
    """Drop-in for Flower's ``create_shares``: ``num`` shares of ``secret``, any ``threshold`` of
    which rebuild it, in Flower's layout (``<index: 4 bytes little-endian>`` and one 16-byte
    share per chunk of the PKCS#7-padded secret).

    The polynomial is pycryptodome's ``Shamir.split``: for each chunk in turn, ``threshold - 1``
    random coefficients (``random_bytes(16)`` each, the operating system's generator, highest
    degree first) and the chunk as the constant term, evaluated by Horner's rule at
    ``x = 1 .. num``. pycryptodome multiplies two full field elements bit by bit in pure
    Python, one chunk at a time; here the factor is the small index ``x``, so a product is a few
    shifts and one reduction, and every chunk is computed at once: the chunks lie side by side
    in one integer, a lane of ``128 + w`` bits each (``w`` bits of headroom for the product's
    overflow, reduced lane by lane). Byte-identical to Flower's shares given the same random
    bytes (``tests/unit/test_secagg_speed.py``).
    """
    from Crypto.Util.Padding import pad

    if not 1 <= threshold <= num:
        raise ValueError(f"threshold {threshold} must be between 1 and the {num} shares")
    if num >= 1 << 32:
        raise ValueError("too many shares for a 4-byte index")
    padded = pad(bytes(secret), 16)
    chunks = [int.from_bytes(padded[at : at + 16], "big") for at in range(0, len(padded), 16)]
    drawn = [[int.from_bytes(random_bytes(16), "big") for _ in range(threshold - 1)] for _ in chunks]  # pycryptodome's order
    width = max(8, num.bit_length())
    lane = 128 + width

    def packed(values: Sequence[int]) -> int:
        out = 0
        for i, v in enumerate(values):
            out |= v << (i * lane)
        return out

    coeffs = [packed([d[k] for d in drawn]) for k in range(threshold - 1)] + [packed(chunks)]
    low = packed([_MASK128] * len(chunks))
    over_mask = packed([(1 << width) - 1] * len(chunks))
    shares = []
    for x in range(1, num + 1):
        bits = [b for b in range(x.bit_length()) if (x >> b) & 1]
        y = 0
        for c in coeffs:
            z = 0
            for b in bits:
                z ^= y << b
            over = (z >> 128) & over_mask  # each lane's bits above 128: x^128 = x^7 + x^2 + x + 1
            y = (z & low) ^ over ^ (over << 1) ^ (over << 2) ^ (over << 7) ^ c
        share = bytearray(x.to_bytes(4, "little", signed=False))
        for i in range(len(chunks)):
            share += ((y >> (i * lane)) & _MASK128).to_bytes(16, "big")
        shares.append(bytes(share))
    return shares


def combine_shares(share_list: Sequence[bytes]) -> bytes:
    """Drop-in for Flower's ``combine_shares`` (one secret); raises ``ValueError`` likewise."""
    return combine_shares_many([share_list])[0]
