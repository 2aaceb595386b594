"""Random draws for differential privacy from a cryptographic generator.

A DP guarantee holds only if no one can predict the noise. The default
generators of torch (Mersenne Twister) and numpy (PCG64) are not
cryptographic: anyone who guesses their seed, or observes enough of their
output, can recompute the noise and subtract it from a released update.
``KeyedRandom`` draws from the ChaCha20 keystream of a 32-byte key instead, so
predicting a draw means breaking ChaCha20. The same key gives the same draws,
which lets the holder of the key replay a round.

Gaussian noise is the sum of four Box-Muller draws, halved, which is how
Opacus draws noise in its secure mode. The values one floating-point
Gaussian draw can take have gaps, and the gaps can give away the value the
noise was added to. Opacus cites these attacks (arXiv 2107.10138 and
2112.05307) and takes the sum of four from section 5.1 of the first.

This module needs only numpy and ``cryptography``, so the aggregation image,
which has no torch, can use it too.
"""

import hashlib
import hmac
import math
import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import DTypeLike

__all__ = ["KEY_BYTES", "KeyedRandom", "derive_key"]

KEY_BYTES = 32
_ZERO_NONCE = bytes(16)
# ChaCha20 in ``cryptography`` has a 32-bit block counter: at most 2^32
# blocks of 64 bytes per key.
_MAX_STREAM_BYTES = 2**32 * 64
# A uniform draw takes the top bits of a keystream word: as many as the
# float type's significand holds.
_UNIFORM_BITS: dict[np.dtype, tuple[int, np.dtype]] = {
    np.dtype(np.float64): (53, np.dtype("<u8")),
    np.dtype(np.float32): (24, np.dtype("<u4")),
}
# Standard normal draws summed into one noise value.
_SUMMED_DRAWS = 4


def derive_key(secret: bytes, label: str) -> bytes:
    """Return the 32-byte key for ``label`` under ``secret`` (HMAC-SHA256).

    Keys derived for different labels are independent, so one secret can key
    several streams, such as a round's batch sampling and its noise.
    """
    return hmac.new(secret, label.encode(), hashlib.sha256).digest()


class KeyedRandom:
    """Uniform, Gaussian and Poisson-sampling draws from a ChaCha20 keystream.

    Draws consume the keystream in call order: two instances made from one key
    return the same values for the same sequence of calls.

    Args:
        key: 32 secret bytes. Use each key for one stream of draws only; a
            key that draws noise for two releases lets anyone who receives
            both cancel the noise.

    Raises:
        ValueError: the key is not 32 bytes.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray | memoryview):
            raise ValueError(
                f"a KeyedRandom key must be {KEY_BYTES} bytes, got "
                f"{type(key).__name__}; pass os.urandom({KEY_BYTES}) or a "
                "derive_key result"
            )
        if len(key) != KEY_BYTES:
            raise ValueError(
                f"a KeyedRandom key must be {KEY_BYTES} bytes, got {len(key)}"
            )
        cipher = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None)
        self._encryptor = cipher.encryptor()
        self._bytes_used = 0

    @classmethod
    def from_entropy(cls) -> "KeyedRandom":
        """Return a generator keyed from the operating system's entropy."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def uniform(self, count: int, dtype: DTypeLike = np.float64) -> np.ndarray:
        """Return ``count`` draws uniform on [0, 1).

        float64 draws are multiples of 2^-53 taken from 64-bit words, float32
        draws multiples of 2^-24 from 32-bit words, so every draw is exact.

        Raises:
            ValueError: ``count`` is negative, ``dtype`` is neither float32
                nor float64, or the draws would run past the 2^38 bytes one
                ChaCha20 key can produce.
        """
        _check_count(count)
        bits, word = _UNIFORM_BITS[_float_type(dtype)]
        words = np.frombuffer(self._keystream(word.itemsize * count), dtype=word)
        shift = 8 * word.itemsize - bits
        return (words >> shift).astype(dtype) * np.asarray(2.0**-bits, dtype)

    def standard_normal(self, count: int, dtype: DTypeLike = np.float64) -> np.ndarray:
        """Return ``count`` draws of N(0, 1), by the Box-Muller transform."""
        _check_count(count)
        pairs = (count + 1) // 2
        uniforms = self.uniform(2 * pairs, dtype)
        # 1 - u is exact and lies in (0, 1], so the logarithm is finite.
        # (numpy's log is vectorized for float32 where its log1p is not.)
        radius = np.sqrt(-2 * np.log(1 - uniforms[:pairs]))
        angle = np.asarray(2 * math.pi, dtype) * uniforms[pairs:]
        draws = np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))
        return draws[:count]

    def gaussian_noise(
        self, shape: tuple[int, ...], std: float, dtype: DTypeLike = np.float64
    ) -> np.ndarray:
        """Return noise of ``shape`` with entries drawn from N(0, std^2).

        Each entry is ``std`` times the sum of four standard normal draws,
        halved, so the variance is ``std**2``. Use float32 for noise added to
        float32 values: it needs half the keystream, and for 77,169 values it
        ran about eight times faster than float64 in one measurement.

        Raises:
            ValueError: ``std`` is negative, not finite or so large that the
                noise would overflow ``dtype``, or ``shape`` has a negative
                dimension.
        """
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"noise std must be finite and >= 0, got {std}")
        largest = float(np.finfo(_float_type(dtype)).max)
        # A Box-Muller draw is at most sqrt(2 ln 2^53) < 9 in magnitude, so
        # the halved sum of four is below 18 standard deviations.
        if std > largest / 32:
            raise ValueError(
                f"noise std {std} would overflow {np.dtype(dtype)}; scale the "
                "values down or draw float64"
            )
        if any(size < 0 for size in shape):
            raise ValueError(f"noise shape must not be negative, got {shape}")
        count = math.prod(shape)
        draws = self.standard_normal(_SUMMED_DRAWS * count, dtype)
        summed = draws.reshape(_SUMMED_DRAWS, count).sum(axis=0)
        return (summed * np.asarray(std / 2, dtype)).reshape(shape)

    def poisson_sample(self, population: int, rate: float) -> np.ndarray:
        """Return the sorted indices below ``population`` that a Poisson draw keeps.

        Each index is kept independently with probability ``rate``.

        Raises:
            ValueError: ``rate`` is outside [0, 1].
        """
        if not 0 <= rate <= 1:
            raise ValueError(f"sampling rate must be in [0, 1], got {rate}")
        return np.flatnonzero(self.uniform(population) < rate)

    def _keystream(self, count: int) -> bytes:
        if self._bytes_used + count > _MAX_STREAM_BYTES:
            raise ValueError(
                f"{count} more bytes of keystream would pass the "
                f"{_MAX_STREAM_BYTES} bytes one ChaCha20 key can produce "
                f"({self._bytes_used} used); draw less at once, or derive a "
                "new key for further draws"
            )
        self._bytes_used += count
        return self._encryptor.update(bytes(count))


def _check_count(count: int) -> None:
    if count < 0:
        raise ValueError(f"the number of draws must be >= 0, got {count}")


def _float_type(dtype: DTypeLike) -> np.dtype:
    resolved = np.dtype(dtype)
    if resolved not in _UNIFORM_BITS:
        raise ValueError(f"draws are float32 or float64, not {resolved}")
    return resolved
