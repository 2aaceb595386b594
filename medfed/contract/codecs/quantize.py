"""Stochastic rounding to signed integer levels, shared by the quantizing codecs.

``int8``, ``lowbit`` and topk's int8 values all map a value x to a level q in
``[-level_max, level_max]`` with ``x ~ q * scale``. Rounding is stochastic:
``q = floor(x / scale + u)`` with u uniform on [0, 1), so
``E[q * scale] = x`` (unbiased) and ``|q * scale - x| < scale`` per element,
up to the float32 rounding of the decoded product (relative 2**-24).

A data-dependent scale is ``max|x| / level_max`` over a tensor or a chunk of
it, so no value is clipped. With a ``step_rms`` the scale is instead
``max(step_rms * rms, max|x| / level_max)``, where rms is the chunk's root
mean square: a coarse step fixed relative to the typical value, which still
never clips. Most levels then fall in a few values near 0 and cost about 2 to
3 bits each once zstd entropy-codes them.
"""

import numpy as np

from medfed.errors import EnvelopeError

__all__ = [
    "check_levels",
    "check_scales",
    "chunk_count",
    "chunk_scales",
    "dequantize",
    "expand_scales",
    "quantize_chunks",
    "stochastic_levels",
]

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def chunk_count(size: int, chunk_size: int) -> int:
    """Return the number of scales of a tensor of ``size`` elements.

    A ``chunk_size`` of 0 means one scale for the whole tensor.
    """
    if chunk_size == 0:
        return 1
    return -(-size // chunk_size)


def chunk_scales(
    flat: np.ndarray, chunk_size: int, level_max: int, step_rms: float = 0.0
) -> np.ndarray:
    """Return the float32 scale of each chunk.

    The scale is the least float32 >= ``max|x| / level_max``, or, when
    ``step_rms`` is positive, >= ``max(step_rms * rms, max|x| / level_max)``
    with rms the chunk's root mean square (over its real elements, not the
    zero padding of the last chunk).
    """
    chunk = chunk_size or max(flat.size, 1)
    count = chunk_count(flat.size, chunk_size)
    padded = np.zeros(count * chunk, dtype=np.float64)
    padded[: flat.size] = np.abs(flat)
    rows = padded.reshape(count, chunk)
    targets = rows.max(axis=1) / level_max
    if step_rms > 0 and count:
        lengths = np.full(count, chunk, dtype=np.float64)
        lengths[-1] = flat.size - chunk * (count - 1) or 1
        rms = np.sqrt(np.square(rows).sum(axis=1) / lengths)
        # step_rms * rms passes the largest float32 when rms is above
        # 3.4e38 / step_rms (2.7e36 at step_rms 127), and an infinite scale
        # decodes to NaN. max|x| / level_max stays below the cap, so the
        # capped scale still clips nothing.
        targets = np.minimum(np.maximum(targets, step_rms * rms), _FLOAT32_MAX)
    scales = targets.astype(np.float32)
    # Rounding to float32 may land one step below the target, which for the
    # max|x| / level_max target would push x / scale past level_max and into
    # the clip, so such a scale moves one float32 step up.
    short = scales.astype(np.float64) < targets
    scales[short] = np.nextafter(scales[short], np.float32(np.inf))
    return scales


def expand_scales(scales: np.ndarray, size: int, chunk_size: int) -> np.ndarray:
    """Return one scale per element from one scale per chunk."""
    if chunk_size == 0:
        return np.full(size, scales[0], dtype=np.float32)
    return np.repeat(scales, chunk_size)[:size]


def stochastic_levels(
    steps: np.ndarray, rng: np.random.Generator, level_max: int
) -> np.ndarray:
    """Round float64 ``steps`` (x / scale) down or up at random, as float64 levels.

    Each step rounds up with probability equal to its fractional part, so the
    expected level is the step. Steps must lie in ``[-level_max, level_max]``.
    """
    levels = np.floor(steps + rng.random(steps.shape))
    # steps + u can round up to level_max + 1 in float64 when u is within
    # 2**-46 of 1, so the clip matters with probability ~1e-14.
    np.clip(levels, -level_max, level_max, out=levels)
    return levels


def quantize_chunks(
    flat: np.ndarray,
    chunk_size: int,
    level_max: int,
    rng: np.random.Generator,
    step_rms: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a flat float32 tensor with one data-dependent scale per chunk.

    ``step_rms`` is passed to ``chunk_scales``.

    Returns:
        The float64 levels, one per element, and the float32 scales, one per
        chunk (``chunk_count`` of them).
    """
    scales = chunk_scales(flat, chunk_size, level_max, step_rms)
    per_element = expand_scales(scales, flat.size, chunk_size).astype(np.float64)
    steps = np.divide(flat, per_element, out=np.zeros(flat.size), where=per_element > 0)
    return stochastic_levels(steps, rng, level_max), scales


def dequantize(levels: np.ndarray, scales: np.ndarray, chunk_size: int) -> np.ndarray:
    """Return the flat float32 tensor ``levels * scale``, computed in float32."""
    flat = levels.reshape(-1).astype(np.float32)
    if chunk_size == 0:
        flat *= scales[0]
    else:
        flat *= expand_scales(scales, flat.size, chunk_size)
    return flat


def check_levels(field: str, levels: np.ndarray, level_max: int) -> None:
    """Raise EnvelopeError unless every level lies in ``[-level_max, level_max]``."""
    if not levels.size:
        return
    if int(levels.min()) < -level_max or int(levels.max()) > level_max:
        raise EnvelopeError(
            f"payload array {field!r} contains a level outside "
            f"[-{level_max}, {level_max}]"
        )


def check_scales(field: str, scales: np.ndarray) -> None:
    """Raise EnvelopeError unless every scale is finite and non-negative."""
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise EnvelopeError(
            f"payload array {field!r} contains a negative, NaN or infinite scale"
        )
