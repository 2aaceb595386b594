"""Central (site-level) differential privacy at the aggregation service.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018): each site's delta is clipped to L2 norm ``C``,
the clipped deltas are summed, and Gaussian noise ``N(0, (sigma * C)^2)`` is
added to every coordinate of the sum. The sum is then divided by the *fixed*
number of sites per round, not by the number that sent updates, so one site's
presence changes the result by at most ``C / sites_per_round``. The guarantee protects
a whole site's data, on top of whatever DP-SGD the sites run locally.

Adaptive clipping (Andrew et al., "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021) moves ``C`` each round toward the
``target_quantile`` of the update norms, from a noised count of the sites
whose norm was at most ``C``::

    below = (count + N(0, count_stddev^2)) / sites_per_round
    C = C * exp(-clip_learning_rate * (below - target_quantile))

The delta noise multiplier then becomes ``(sigma^-2 - (2 count_stddev)^-2)^-1/2``
so that both releases together cost what one Gaussian mechanism with
multiplier ``sigma`` costs; the accountant records ``sigma``.

Privacy is accounted per round with an Opacus accountant (RDP or PRV) at
sampling rate ``sites_per_round / total_sites``. The noise comes from a
ChaCha20 keystream (``medfed.dp_random``) under a key the service draws from
the operating system and never stores.
"""

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfed.aggregation.params import require_float, require_int
from medfed.aggregation.strategies.base import (
    SiteUpdate,
    Strategy,
    UpdateSum,
    Weights,
    sum_updates,
)
from medfed.aggregation.wrappers.base import (
    StrategyWrapper,
    register_wrapper,
    wrapped_chain,
)
from medfed.aggregation.wrappers.clipping import clip_update
from medfed.dp_random import KEY_BYTES, KeyedRandom
from medfed.errors import AggregationError, ConfigError

__all__ = ["CLIP_INDICATOR", "CentralDP"]

logger = logging.getLogger(__name__)

#: Extras group in which each site sends ``{"below": [1.0]}`` when its delta's
#: norm was at most the published clip norm, else ``[0.0]``. Only adaptive
#: clipping under secure aggregation needs it.
CLIP_INDICATOR = "clip_indicator"

_ACCOUNTANTS = ("rdp", "prv")


@register_wrapper
class CentralDP(StrategyWrapper):
    """Clips, sums and noises the deltas, then hands the noisy sum to ``inner``.

    Args:
        inner: the strategy that applies the noisy mean delta; it must not
            need individual updates.
        clip_norm: L2 bound ``C`` on one site's delta (the starting bound under
            adaptive clipping), > 0.
        noise_multiplier: ``sigma``, the noise standard deviation in units of
            ``C``, > 0.
        total_sites: number of sites in the study, >= 1.
        sites_per_round: fixed denominator, the number of sites selected each
            round, in [1, total_sites]; defaults to ``total_sites``.
        target_delta: the delta at which epsilon is reported, in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.
        adaptive_clipping: move ``C`` toward a quantile of the update norms.
        target_quantile: fraction of sites meant to be unclipped, in [0, 1].
        clip_learning_rate: geometric step of ``C`` per round, > 0.
        clip_count_stddev: noise on the unclipped count; defaults to
            ``sites_per_round / 20`` as Andrew et al. suggest. It must exceed
            ``noise_multiplier / 2``.
        noise_key: 32-byte key of the noise generator (``KeyedRandom``), for
            tests only: anyone who has it can subtract the noise, and the
            service builds the strategy anew each round, so a fixed key would
            repeat the noise. The default draws a key from the operating
            system's entropy; a study config cannot set one.
    """

    name = "central_dp"
    combines_updates = True

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float,
        noise_multiplier: float,
        total_sites: int,
        sites_per_round: int | None = None,
        target_delta: float = 1e-5,
        accountant: str = "rdp",
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clip_count_stddev: float | None = None,
        noise_key: bytes | None = None,
    ) -> None:
        super().__init__(inner)

        base = wrapped_chain(inner)[-1]
        if base.name == "scaffold":
            raise ConfigError(
                "central_dp cannot wrap scaffold: the sites' control deltas would "
                "be released without clipping or noise; use fedavg, fedprox or a "
                "server optimizer with central_dp"
            )
        if inner.needs_individual_updates:
            raise ConfigError(
                f"central_dp cannot wrap {inner.name!r}, which needs each site's "
                "update, because the noise is calibrated to the mean of clipped "
                "updates; list central_dp alone or use norm_bound"
            )
        self.clip_norm = require_float(
            "clip_norm", clip_norm, minimum=0.0, exclusive_minimum=True
        )
        self.noise_multiplier = require_float(
            "noise_multiplier", noise_multiplier, minimum=0.0, exclusive_minimum=True
        )
        self.total_sites = require_int("total_sites", total_sites, minimum=1)
        self.sites_per_round = require_int(
            "sites_per_round",
            self.total_sites if sites_per_round is None else sites_per_round,
            minimum=1,
        )
        if self.sites_per_round > self.total_sites:
            raise ConfigError(
                f"sites_per_round must be <= total_sites ({self.total_sites}), "
                f"got {self.sites_per_round}"
            )
        self.target_delta = require_float(
            "target_delta",
            target_delta,
            minimum=0.0,
            maximum=1.0,
            exclusive_minimum=True,
            exclusive_maximum=True,
        )
        if accountant not in _ACCOUNTANTS:
            raise ConfigError(
                f"accountant must be one of {list(_ACCOUNTANTS)}, got {accountant!r}"
            )
        self.accountant_name = accountant
        self._accountant = _create_accountant(accountant)

        self._init_adaptive_clipping(
            adaptive_clipping, target_quantile, clip_learning_rate, clip_count_stddev
        )
        self._noise = _noise_source(noise_key)

    def _init_adaptive_clipping(
        self,
        adaptive_clipping: bool,
        target_quantile: float,
        clip_learning_rate: float,
        clip_count_stddev: float | None,
    ) -> None:
        if not isinstance(adaptive_clipping, bool):
            raise ConfigError(
                f"adaptive_clipping must be true or false, got {adaptive_clipping!r}"
            )
        self.adaptive_clipping = adaptive_clipping
        self.target_quantile = require_float(
            "target_quantile", target_quantile, minimum=0.0, maximum=1.0
        )
        self.clip_learning_rate = require_float(
            "clip_learning_rate",
            clip_learning_rate,
            minimum=0.0,
            exclusive_minimum=True,
        )
        default_stddev = self.sites_per_round / 20
        self.clip_count_stddev = require_float(
            "clip_count_stddev",
            default_stddev if clip_count_stddev is None else clip_count_stddev,
            minimum=0.0,
            exclusive_minimum=True,
        )
        self.delta_noise_multiplier = self._delta_noise_multiplier()

    def _delta_noise_multiplier(self) -> float:
        if not self.adaptive_clipping:
            return self.noise_multiplier
        count_term = (2 * self.clip_count_stddev) ** -2
        if not self.noise_multiplier**-2 > count_term:
            raise ConfigError(
                "adaptive clipping needs clip_count_stddev > noise_multiplier / 2 "
                f"= {self.noise_multiplier / 2}, got {self.clip_count_stddev}; "
                "raise clip_count_stddev or the number of sites per round"
            )
        return float((self.noise_multiplier**-2 - count_term) ** -0.5)

    @property
    def uniform_weighting(self) -> bool:
        return True

    @property
    def sample_rate(self) -> float:
        """Fraction of the study's sites that take part in a round."""
        # NOTE: the accountant's amplification by sampling assumes Poisson
        # sampling of sites; select_sites draws a fixed number instead.
        return self.sites_per_round / self.total_sites

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]
    ) -> Weights:
        self._check_site_count(len(updates))
        clipped_updates = []
        below = 0
        for update in updates:
            delta, norm = clip_update(update.delta, max_norm=self.clip_norm)
            below += int(norm <= self.clip_norm)
            clipped_updates.append(
                SiteUpdate(update.site, delta, update.sample_count, update.extras)
            )
        summed = sum_updates(clipped_updates, uniform=True)
        return self._release(global_weights, summed, below)

    def aggregate_sum(
        self, global_weights: Mapping[str, np.ndarray], summed: UpdateSum
    ) -> Weights:
        # NOTE: from a sum the server cannot check that sites clipped to
        # ``site_settings()["clip_norm"]``; the guarantee assumes they did.
        self._check_site_count(summed.site_count)
        below: float | None = None
        extras = dict(summed.extras)
        if self.adaptive_clipping:
            indicator = extras.pop(CLIP_INDICATOR, None)
            if indicator is None or "below" not in indicator:
                raise AggregationError(
                    "adaptive clipping under secure aggregation needs every site "
                    f"to send extras {CLIP_INDICATOR!r} with tensor 'below'"
                )
            below = float(np.sum(indicator["below"]))
        return self._release(
            global_weights,
            UpdateSum(summed.delta, summed.weight_total, summed.site_count, extras),
            below,
        )

    def _check_site_count(self, site_count: int) -> None:
        if site_count > self.sites_per_round:
            raise AggregationError(
                f"{site_count} sites sent updates, but central_dp divides by "
                f"sites_per_round={self.sites_per_round}; more updates than that "
                "would exceed the sensitivity the noise is calibrated to"
            )

    def _release(
        self,
        global_weights: Mapping[str, np.ndarray],
        summed: UpdateSum,
        below: float | None,
    ) -> Weights:
        stddev = self.delta_noise_multiplier * self.clip_norm
        noisy = {
            key: np.asarray(value, np.float64)
            + self._noise.gaussian_noise(np.shape(value), stddev)
            for key, value in summed.delta.items()
        }
        released = UpdateSum(
            delta=noisy,
            weight_total=float(self.sites_per_round),
            site_count=summed.site_count,
            extras=summed.extras,
        )
        result = self.inner.aggregate_sum(global_weights, released)
        self._accountant.step(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
        )
        if self.adaptive_clipping and below is not None:
            self._adapt_clip_norm(below)
        logger.info(
            "central DP released round %s: epsilon %.4g at delta %g",
            len(self.history()),
            self.epsilon(),
            self.target_delta,
        )
        return result

    def _adapt_clip_norm(self, below: float) -> None:
        noisy_count = below + float(
            self._noise.gaussian_noise((), self.clip_count_stddev)
        )
        fraction = noisy_count / self.sites_per_round
        self.clip_norm *= math.exp(
            -self.clip_learning_rate * (fraction - self.target_quantile)
        )

    def history(self) -> list[tuple[float, float, int]]:
        """Return the accountant's (noise multiplier, sample rate, rounds) runs."""
        return [
            (float(noise), float(rate), int(steps))
            for noise, rate, steps in self._accountant.history
        ]

    def epsilon(self) -> float:
        """Return the epsilon spent so far at ``target_delta``; 0 before round one."""
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=self.target_delta))

    def site_settings(self) -> dict[str, float]:
        settings = dict(self.inner.site_settings())
        settings["clip_norm"] = min(settings.get("clip_norm", np.inf), self.clip_norm)
        return settings

    def own_state_dict(self) -> dict[str, np.ndarray]:
        history = np.array(self.history(), np.float64).reshape(-1, 3)
        return {
            "accountant_history": history,
            "clip_norm": np.array([self.clip_norm], np.float64),
        }

    def load_own_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        expected = {"accountant_history", "clip_norm"}
        if set(state) != expected:
            raise AggregationError(
                f"state for central_dp must have keys {sorted(expected)}, "
                f"got {sorted(state)}"
            )
        history = np.asarray(state["accountant_history"], np.float64)
        clip_norm = np.asarray(state["clip_norm"], np.float64)
        if history.ndim != 2 or history.shape[1] != 3 or clip_norm.shape != (1,):
            raise AggregationError(
                "central_dp state has accountant_history of shape "
                f"{list(history.shape)} (expected [runs, 3]) and clip_norm of "
                f"shape {list(clip_norm.shape)} (expected [1])"
            )
        if not np.all(np.isfinite(history)) or not clip_norm[0] > 0:
            raise AggregationError(
                "central_dp state has a non-finite accountant history or a "
                f"non-positive clip_norm {clip_norm[0]}"
            )
        restored: list[Any] = [
            (float(noise), float(rate), int(steps)) for noise, rate, steps in history
        ]
        self._accountant.history = restored
        self.clip_norm = float(clip_norm[0])


def _create_accountant(name: str) -> Any:
    """Create an Opacus accountant, importing Opacus only for central DP.

    Opacus imports torch, which the aggregation image leaves out, so the
    service imports it only when a study uses this wrapper.

    Raises:
        ConfigError: Opacus is not installed.
    """
    try:
        from opacus.accountants.utils import create_accountant
    except ImportError as error:
        raise ConfigError(
            f"the central_dp wrapper needs Opacus and torch, which are not "
            f"installed here ({error}); run the aggregation service from an "
            "install with medfed's full dependencies, such as the coordinator "
            "image"
        ) from None
    return create_accountant(name)


def _noise_source(noise_key: bytes | None) -> KeyedRandom:
    if noise_key is None:
        return KeyedRandom.from_entropy()
    if not isinstance(noise_key, bytes) or len(noise_key) != KEY_BYTES:
        actual = (
            f"{len(noise_key)} bytes"
            if isinstance(noise_key, bytes)
            else type(noise_key).__name__
        )
        raise ConfigError(
            f"central_dp noise_key must be {KEY_BYTES} bytes, got {actual}; leave "
            "it out, so that the key comes from the operating system"
        )
    return KeyedRandom(noise_key)
