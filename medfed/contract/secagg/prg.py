"""Expansion of a 32-byte seed into a mask vector of ring elements.

The pseudorandom generator is the ChaCha20 keystream (``cryptography``), keyed
by the seed with a zero nonce. Every seed is derived for one mask of one round
and used once, so the zero nonce never repeats under the same key.
"""

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from medfed.errors import SecureAggregationError

__all__ = ["SEED_BYTES", "expand_mask"]

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)
# ChaCha20 in ``cryptography`` has a 32-bit block counter: at most 2^32
# blocks of 64 bytes per key.
_MAX_STREAM_BYTES = 2**32 * 64


def expand_mask(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """Return ``length`` uniformly random ring elements derived from ``seed``.

    Args:
        seed: 32 secret bytes.
        length: the number of elements.
        dtype: ``uint32`` or ``uint64``; the ring is Z_{2^(8 * itemsize)}.

    Raises:
        SecureAggregationError: the seed is not 32 bytes or the stream would be
            longer than ChaCha20 allows for one key.
    """
    if len(seed) != SEED_BYTES:
        raise SecureAggregationError(
            f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}"
        )
    byte_count = length * np.dtype(dtype).itemsize
    if length < 0 or byte_count > _MAX_STREAM_BYTES:
        raise SecureAggregationError(
            f"mask length {length} is outside what one ChaCha20 stream can cover"
        )
    encryptor = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(byte_count))
    # Little-endian so that every platform expands the same seed identically.
    return np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
