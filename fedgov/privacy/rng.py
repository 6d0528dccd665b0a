"""The random numbers of differential privacy: AES-256-CTR keyed from the operating system.

DP noise protects only while nobody can predict or regenerate it. A node's DP-SGD noise, its
Poisson batch sampling (which the amplification by sampling in the accounting relies on) and
its distributed-DP noise share and stochastic rounding all come from a :class:`SecureRNG`:

* **Generator**: the keystream of AES-256 in counter mode (NIST SP 800-38A; the construction of
  NIST SP 800-90A's CTR_DRBG without its reseeding), computed by OpenSSL through the
  ``cryptography`` package (AES-NI where the CPU has it). Nothing cryptographic is written
  here: this module only turns keystream bytes into numbers.
* **Key**: 256 bits from ``os.urandom`` (the kernel's CSPRNG), drawn fresh for every
  :meth:`SecureRNG.fresh`, i.e. for every training round at every node; it is kept in the
  cipher object only, never logged, stored or sent, and dies with the object.
* **Why it is secure**: as long as AES-256 is a pseudo-random permutation, its counter-mode
  keystream cannot be told from uniform bytes by anyone without the key (advantage at most
  about ``q^2 / 2^129`` for ``q`` blocks, plus that of breaking AES; a round draws far fewer
  than ``2^40`` blocks). So the noise cannot be predicted from other outputs, nor regenerated
  by searching seeds: the search space is ``2^256`` keys, not the ``2^32`` seeds torch's CPU
  generator keeps of a seed, nor the state of a Mersenne Twister or NumPy's PCG64, which their
  outputs reveal.

Numbers from the keystream: a uniform in ``[0, 1)`` is 53 keystream bits times ``2^-53``
(every float64 multiple of ``2^-53``, equally likely); a normal is Box-Muller in float64
(``sqrt(-2 log(1 - u1)) * cos/sin(2 pi u2)``, radius at most ``sqrt(106 ln 2) = 8.6``, which
the exact radius exceeds with probability ``2^-53``), cast to the requested dtype; a geometric is
the inverse CDF of a uniform. The methods ``random`` and ``geometric`` take the arguments of
``numpy.random.Generator``'s, so code written for one takes the other.

:meth:`SecureRNG.from_seed` derives the key from a seed instead: reproducible, hence for
tests only (whoever knows the seed can regenerate the noise). Not thread-safe: one generator
per thread. Pure: no I/O beyond reading the OS's entropy.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, overload

import numpy as np
import torch

__all__ = ["KEY_BYTES", "RandomSource", "SecureRNG", "draw_normal", "draw_uniform"]

KEY_BYTES = 32
"""AES-256: a 256-bit key."""
_BLOCK = 1 << 15
"""64-bit keystream words per cipher call (256 KiB): numbers are made block by block, in cache
(measured, one thread: 4-5 ns a normal, against 13 ns when 2^20 are made in one pass)."""
_ZEROS = memoryview(bytes(8 * _BLOCK))
_MASK53 = (1 << 53) - 1
_TWO_PI = 2.0 * math.pi


def _os_key() -> bytes:
    """A fresh key from the OS's CSPRNG (the only source of :meth:`SecureRNG.fresh`'s randomness)."""
    return os.urandom(KEY_BYTES)


class SecureRNG:
    """Uniform, normal and geometric numbers from the AES-256-CTR keystream of a secret key.

    ``SecureRNG.fresh()`` outside tests; ``SecureRNG.from_seed(seed)`` for reproducible tests.
    """

    __slots__ = ("_bits", "_enc", "_raw", "_words")

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        if len(key) != KEY_BYTES:
            raise ValueError(f"the key must be {KEY_BYTES} bytes (AES-256), got {len(key)}")
        # A key is used once (fresh or derived per seed), so a zero initial counter is safe.
        self._enc = Cipher(algorithms.AES(bytes(key)), modes.CTR(b"\x00" * 16)).encryptor()
        self._raw = bytearray(8 * _BLOCK + 15)  # update_into needs block_size - 1 spare bytes
        self._words = torch.frombuffer(self._raw, dtype=torch.int64, count=_BLOCK)
        self._bits = torch.empty(_BLOCK, dtype=torch.int64)

    @classmethod
    def fresh(cls) -> SecureRNG:
        """A generator keyed with 256 fresh bits from ``os.urandom``."""
        return cls(_os_key())

    @classmethod
    def from_seed(cls, seed: int | bytes | str) -> SecureRNG:
        """A reproducible generator (tests and ``reproducible_noise`` only): key ``SHA-256(seed)``."""
        data = seed if isinstance(seed, bytes) else str(seed).encode()
        return cls(hashlib.sha256(b"fedgov-secure-rng|" + data).digest())

    def __repr__(self) -> str:
        return "SecureRNG(AES-256-CTR)"  # never the key

    def random_bytes(self, n: int) -> bytes:
        """``n`` bytes of keystream."""
        return self._enc.update(bytes(n)) if n > 0 else b""

    def _fill_uniform(self, out: torch.Tensor) -> torch.Tensor:
        """Fill the 1-d float64 tensor ``out`` (at most ``_BLOCK`` long) with uniforms in [0, 1)."""
        n = out.numel()
        self._enc.update_into(_ZEROS[: 8 * n], memoryview(self._raw)[: 8 * n + 15])
        bits = torch.bitwise_and(self._words[:n], _MASK53, out=self._bits[:n])
        return out.copy_(bits).mul_(2.0**-53)

    # --- uniforms -----------------------------------------------------------------------------

    def uniform_tensor(self, shape: int | tuple[int, ...]) -> torch.Tensor:
        """Uniform float64 numbers in ``[0, 1)`` (multiples of ``2^-53``), a torch tensor."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        out = torch.empty(math.prod(shape), dtype=torch.float64)
        for start in range(0, out.numel(), _BLOCK):
            self._fill_uniform(out[start : start + _BLOCK])
        return out.reshape(shape)

    def uniform(self, n: int | tuple[int, ...]) -> np.ndarray:
        """Uniform float64 numbers in ``[0, 1)`` (multiples of ``2^-53``), a NumPy array."""
        return self.uniform_tensor(n).numpy()

    def random(self, size: int | tuple[int, ...]) -> np.ndarray:
        """``numpy.random.Generator.random``'s signature: :meth:`uniform`."""
        return self.uniform(size)

    def geometric(self, p: float, size: int) -> np.ndarray:
        """``size`` geometric numbers on ``1, 2, ...`` with success probability ``p`` (int64), as
        ``numpy.random.Generator.geometric``: ``1 + floor(log(1 - u) / log(1 - p))``."""
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if p == 1:
            return np.ones(size, dtype=np.int64)
        u = self.uniform_tensor(size)
        return torch.log1p(u.neg_()).div_(math.log1p(-p)).floor_().add_(1).to(torch.int64).numpy()

    # --- normals ------------------------------------------------------------------------------

    @overload
    def standard_normal(self, shape: int | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...
    @overload
    def standard_normal(self, shape: int | tuple[int, ...], dtype: Any = ...) -> np.ndarray: ...

    def standard_normal(self, shape: int | tuple[int, ...], dtype: Any = np.float32) -> torch.Tensor | np.ndarray:
        """N(0, 1) numbers of ``shape``: a torch tensor when ``dtype`` is a ``torch.dtype``, else a
        NumPy array (float32 by default). Box-Muller in float64, block by block, then cast."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = math.prod(shape)
        as_torch = isinstance(dtype, torch.dtype)
        out_dtype = dtype if as_torch else _torch_dtype(np.dtype(dtype))
        out = torch.empty(n + (n & 1), dtype=out_dtype)
        u = torch.empty(min(_BLOCK, len(out)), dtype=torch.float64)
        radius = torch.empty(len(u) // 2, dtype=torch.float64)
        for start in range(0, len(out), _BLOCK):
            m = min(_BLOCK, len(out) - start) // 2  # pairs in this block
            uu = self._fill_uniform(u[: 2 * m])
            r = torch.neg(uu[:m], out=radius[:m]).add_(1.0)  # 1 - u1 in (0, 1]
            r.log_().mul_(-2.0).sqrt_()
            angle = uu[m:].mul_(_TWO_PI)
            torch.mul(r, torch.cos(angle), out=out[start : start + m])
            torch.mul(r, angle.sin_(), out=out[start + m : start + 2 * m])
        result = out[:n].reshape(shape)
        return result if as_torch else result.numpy()


RandomSource = SecureRNG | torch.Generator
"""Where DP randomness comes from: a :class:`SecureRNG`, or a seeded ``torch.Generator`` (tests,
reproducible mode and Opacus replays only)."""


def draw_uniform(shape: int | tuple[int, ...], source: RandomSource) -> torch.Tensor:
    """Uniform float64 numbers in ``[0, 1)`` from ``source`` (``torch.rand`` for a torch generator)."""
    if isinstance(source, SecureRNG):
        return source.uniform_tensor(shape)
    size = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.rand(size, generator=source, dtype=torch.float64)


def draw_normal(
    shape: int | tuple[int, ...] | torch.Size, source: RandomSource, *, dtype: torch.dtype = torch.float32, std: float = 1.0
) -> torch.Tensor:
    """N(0, std^2) numbers from ``source``: for a torch generator exactly
    ``torch.normal(0.0, std, size, generator=source, dtype=dtype)`` (what Opacus draws)."""
    size = (shape,) if isinstance(shape, int) else tuple(shape)
    if isinstance(source, SecureRNG):
        z = source.standard_normal(size, dtype)
        return z if std == 1.0 else z.mul_(std)
    return torch.normal(mean=0.0, std=std, size=size, generator=source, dtype=dtype)


def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    if dtype == np.float32:
        return torch.float32
    if dtype == np.float64:
        return torch.float64
    raise TypeError(f"standard_normal gives float32 or float64, not {dtype}")
