"""Random-k sparsification with positions drawn from a seed in the header.

Per tensor of d elements, the codec keeps ``k = kept_count(fraction, d)``
positions drawn uniformly without replacement, and sends only their values.
The positions are not sent: the decoder draws them again from the seed in
``params`` and the tensor's name.

The positions are those of the k smallest of d keys from the PCG64 bit
generator, seeded through ``SeedSequence([seed, name_hash])``. Both are
fixed algorithms, while NumPy's random compatibility policy lets
``Generator`` methods such as ``choice`` change between releases, so those
are not used. NOTE: site and service must still produce the same PCG64 raw
stream; a test pins the positions for one seed so that a change shows up.
Ties among 64-bit keys would make the choice ambiguous. At d = 64 Mi
elements their probability is about 1e-4 per tensor, and a tie matters
only when it straddles the k-th key.

With ``rescale`` (the default) kept values are multiplied by d / k, so
``E[decode(encode(x))] = x`` over the seed: unbiased, at the price of a
variance of ``(d / k - 1) * x**2`` per element. Without it, the decoded
tensor is x on the kept positions and zero elsewhere (biased by the factor
k / d), which suits error feedback better.

Not dense, so it does not compose with masking secure aggregation.
"""

import hashlib
import math
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from medfed.contract.codecs.base import (
    Codec,
    TensorSpec,
    register_codec,
    require_array,
    require_keys,
)
from medfed.contract.codecs.params import (
    MAX_SEED,
    check_choice,
    check_flag,
    check_integer,
    check_number,
    check_update_tensor,
    kept_count,
)
from medfed.contract.codecs.sparse import VALUE_DTYPES, encode_values, scatter
from medfed.errors import EnvelopeError

__all__ = ["RandKCodec", "random_positions"]


def random_positions(
    seed: int, name: str, size: int, kept: int, *, block_size: int = 2**20
) -> np.ndarray:
    """Return ``kept`` distinct sorted positions in [0, size), drawn from ``seed``.

    The result is the positions of the ``kept`` smallest of ``size`` keys
    from the bit generator. Keys are drawn ``block_size`` at a time and only
    those below a threshold are kept as candidates, so memory grows with
    ``kept`` and ``block_size`` rather than with ``size``. The threshold
    admits about ``kept + 8 * sqrt(kept) + 64`` keys on average; in the rare
    case that fewer than ``kept`` pass, it doubles and the stream restarts.
    """
    if kept == size:
        return np.arange(size)
    name_hash = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    threshold = _initial_threshold(size, kept)
    while True:
        generator = np.random.PCG64(np.random.SeedSequence([seed, name_hash]))
        keys, positions = _keys_below(generator, size, threshold, block_size)
        if keys.size >= kept or threshold == 2**64 - 1:
            break
        threshold = min(2**64 - 1, threshold * 2)
    chosen = positions[np.argpartition(keys, kept - 1)[:kept]]
    chosen.sort()
    return chosen


def _initial_threshold(size: int, kept: int) -> int:
    """Return a key threshold that about ``kept + 8 * sqrt(kept) + 64`` keys pass."""
    expected = kept + 8 * math.sqrt(kept) + 64
    return min(2**64 - 1, int(expected / size * 2**64))


def _keys_below(
    generator: np.random.PCG64, size: int, threshold: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the keys below ``threshold`` among ``size`` drawn, and their positions."""
    limit = np.uint64(threshold)
    keys, positions = [], []
    for start in range(0, size, block_size):
        block = generator.random_raw(min(block_size, size - start))
        below = np.flatnonzero(block < limit)
        keys.append(block[below])
        positions.append(below + start)
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(positions)


@register_codec
class RandKCodec(Codec):
    """Keeps a random ``fraction`` of each tensor's values."""

    name = "randk"
    linear = False
    dense = False

    def __init__(
        self,
        *,
        fraction: float,
        seed: int | None = None,
        rescale: bool = True,
        value_dtype: str = "float32",
    ) -> None:
        """Validate the parameters.

        Args:
            fraction: share of each tensor's elements to keep, in (0, 1].
            seed: seed of the positions. Leave it unset on a site: each
                ``encode`` then draws a fresh seed and ``params`` reports it,
                so rounds keep different positions. A decoder requires it.
            rescale: multiply kept values by d / k to make the codec unbiased.
            value_dtype: "float32" or "float16" for the kept values.
        """
        self.fraction = check_number(
            self.name, "fraction", fraction, above=0.0, at_most=1.0
        )
        self.seed = seed
        if seed is not None:
            check_integer(self.name, "seed", seed, minimum=0, maximum=MAX_SEED)
        self._fixed_seed = seed is not None
        self.rescale = check_flag(self.name, "rescale", rescale)
        self.value_dtype = check_choice(
            self.name, "value_dtype", value_dtype, VALUE_DTYPES
        )

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "fraction": self.fraction,
            "rescale": self.rescale,
            "value_dtype": self.value_dtype,
        }
        if self.seed is not None:
            params["seed"] = self.seed
        return params

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return ``<name>.values`` per tensor, drawing a seed unless one is fixed."""
        seed = self.seed
        if seed is None or not self._fixed_seed:
            seed = secrets.randbelow(MAX_SEED + 1)
        self.seed = seed
        arrays = {}
        for key, value in update.items():
            flat = check_update_tensor(self.name, key, value).reshape(-1)
            kept = kept_count(self.fraction, flat.size)
            positions = random_positions(seed, key, flat.size, kept)
            values = flat[positions].astype(np.float64)
            if self.rescale and kept:
                values *= flat.size / kept
            arrays[f"{key}.values"] = encode_values(
                self.name, key, values, self.value_dtype
            )
        return arrays

    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        if self.seed is None:
            raise EnvelopeError("codec 'randk' params lack the seed the decoder needs")
        require_keys(payload, (name + ".values" for name, _, _ in specs))
        tensors = {}
        for name, shape, _ in specs:
            size = math.prod(shape)
            kept = kept_count(self.fraction, size)
            values = require_array(payload, f"{name}.values", (kept,), self.value_dtype)
            positions = random_positions(self.seed, name, size, kept)
            tensors[name] = scatter(size, positions, values, shape)
        return tensors
