"""The study config schema: one schema for every study.

A study config is YAML validated by ``load_study_config``. Unknown keys and
invalid values are errors that name the key, the value and what is allowed.
"""

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medfed.contract.codecs.config import CompressionConfig
from medfed.contract.ids import IDENTIFIER_PATTERN
from medfed.contract.local_layers import check_local_patterns
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.errors import ConfigError

__all__ = [
    "AggregationConfig",
    "AsynchronousConfig",
    "CompressionConfig",
    "DataConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "RoundConfig",
    "SiteConfig",
    "StrategyConfig",
    "StudyConfig",
    "TrackingConfig",
    "TrainingConfig",
    "WrapperConfig",
    "asynchronous_conflict",
    "load_study_config",
    "parse_study_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteConfig(_Strict):
    """One hospital taking part in the study."""

    id: str = Field(pattern=IDENTIFIER_PATTERN.pattern)
    #: File name of the site's source data below the dataset's folder.
    source: str | None = None
    #: Per-site privacy budget; overrides ``privacy.epsilon`` / ``privacy.delta``.
    epsilon: float | None = Field(default=None, gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)


class PartitionConfig(_Strict):
    """How a public dataset's training split is divided among the sites.

    Used by benchmark datasets (``pneumoniamnist``); ``name`` is a registered
    partitioner (``iid``, ``label_skew``, ``quantity_skew``) and ``params``
    its keyword arguments, e.g. ``{alpha: 0.5}`` for ``label_skew``.
    """

    name: str = "iid"
    params: dict[str, Any] = Field(default_factory=dict)
    #: Fewest training samples any site may receive.
    min_samples: int = Field(default=50, ge=1)


class DataConfig(_Strict):
    dataset: Literal["heart_disease", "pneumoniamnist"]
    #: Data root; when unset, ``MEDFED_DATA_DIR``, then ``../shared/data``,
    #: then the download cache (see ``medfed.sites.data.root``).
    root: str | None = None
    test_fraction: float = Field(default=0.34, gt=0, lt=1)
    seed: int = 42
    partition: PartitionConfig = PartitionConfig()
    #: Share of each imaging site's partition held out as its validation split.
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    #: Strength in [0, 1] of the per-site scanner intensity profile; 0 = none.
    feature_skew: float = Field(default=0.0, ge=0, le=1)
    #: Image intensities: ``scale`` to [0, 1] or ``standardize`` per site.
    normalization: Literal["scale", "standardize"] = "scale"
    #: Random affine moves (no flips) of each training batch of images.
    augment: bool = False


class ModelConfig(_Strict):
    """A registered model architecture and its constructor's keyword arguments.

    Both are checked at load time by building the model once, so a misspelled
    name or parameter fails before any service starts.
    """

    name: str = Field(min_length=1)
    # Validated when absent too, because a model may require parameters.
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        # Imported here because the registry loads torch, which the
        # aggregation service does not install.
        from medfed.contract.models import model_names

        names = model_names()
        if name not in names:
            raise ValueError(f"unknown model; choose one of {', '.join(names)}")
        return name

    @field_validator("params")
    @classmethod
    def _params_fit(
        cls, params: dict[str, Any], info: ValidationInfo
    ) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:
            # The name was invalid, and that error is reported instead.
            return params
        import torch

        from medfed.contract.models import build_model

        try:
            # Building draws initial weights; fork_rng keeps the caller's
            # torch random state as it was.
            with torch.random.fork_rng(devices=[]):
                build_model(name, **params)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return params


class TrainingConfig(_Strict):
    """Local training at the sites.

    Attributes:
        learning_schedule: ``constant`` keeps ``learning_rate`` in every
            round. ``cosine`` starts at ``learning_rate`` in the first round
            and lowers it toward zero over ``rounds``, one value per round.
        positive_weight: weight of the positive class in the loss
            (``pos_weight`` of ``BCEWithLogitsLoss``). A study lead sets it
            from public figures such as negatives / positives in a benchmark's
            training split, never from a site's own counts, so that the loss
            reveals nothing about any site.
        logit_adjustment: tau of logit-adjusted training (Menon et al.,
            "Long-tail learning via logit adjustment", ICLR 2021), or 0 to
            turn it off. Each
            site adds ``tau * log(positives / negatives)`` of its own
            training split to the logits in its loss, and never at
            evaluation, so a site whose labels are mostly of one class pulls
            the shared model less toward that class. Under DP the site counts
            its labels once, with Gaussian noise of ``privacy.label_count_noise``
            records, and its privacy ledger accounts for that count.
    """

    # Strict, so that YAML's true is not read as one round.
    rounds: int = Field(ge=1, le=100_000, strict=True)
    local_epochs: int = Field(default=1, ge=1, le=1000, strict=True)
    batch_size: int = Field(default=16, ge=1, le=1_000_000, strict=True)
    learning_rate: float = Field(gt=0, le=100)
    learning_schedule: Literal["constant", "cosine"] = "constant"
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    positive_weight: float | None = Field(default=None, gt=0, le=1000)
    logit_adjustment: float = Field(default=0.0, ge=0, le=10)
    seed: int = 0

    def round_learning_rate(self, round_number: int) -> float:
        """Return the local learning rate of round ``round_number`` (from 1)."""
        if self.learning_schedule == "constant":
            return self.learning_rate
        progress = (min(max(round_number, 1), self.rounds) - 1) / self.rounds
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


class WrapperConfig(_Strict):
    """One wrapper around the strategy: norm_bound, central_dp or a robust rule."""

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_noise_key(self) -> "WrapperConfig":
        # The service builds the strategy anew for every round, so a key from
        # the config would add the same noise to every round's sum.
        if self.name == "central_dp" and "noise_key" in self.params:
            raise ValueError(
                "central_dp noise_key is for tests only; remove it, because the "
                "service must draw a new secret key for each round's noise"
            )
        return self


class StrategyConfig(_Strict):
    name: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict)
    #: Wrappers in the order they receive the updates; the first is outermost.
    wrappers: list[WrapperConfig] = Field(default_factory=list, max_length=8)
    #: Shell-style patterns (``fnmatch``) of model parameters that each site
    #: keeps local and never uploads (FedBN-style personalization), e.g.
    #: ``["*.norm*"]``; see ``medfed.contract.local_layers``.
    local_layers: list[str] = Field(default_factory=list, max_length=256)


class PrivacyConfig(_Strict):
    """Record-level DP-SGD settings, the same for every site unless overridden."""

    enabled: bool = True
    #: Target epsilon for the whole study at each site.
    epsilon: float | None = Field(default=None, gt=0, le=100)
    delta: float | None = Field(default=None, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"
    #: Standard deviation, in records, of the Gaussian noise on each label
    #: count that ``training.logit_adjustment`` uses. One record changes one
    #: count by 1, so this is also the count's noise multiplier.
    label_count_noise: float = Field(default=10.0, gt=0, le=1_000_000)

    @model_validator(mode="after")
    def _budget_when_enabled(self) -> "PrivacyConfig":
        if self.enabled and (self.epsilon is None or self.delta is None):
            raise ValueError(
                "privacy.epsilon and privacy.delta are required when privacy.enabled "
                "is true; set both, or set privacy.enabled: false"
            )
        return self


class ParticipationConfig(_Strict):
    """Selection of the sites that train in each round.

    Each round takes ``min(sites, max(minimum, ceil(fraction * sites)))``
    sites, drawn without replacement from the study's seed and the round
    number, so a resumed study selects the same sites again. ``weighted`` draws sites with
    probability proportional to their training-record counts.
    """

    fraction: float = Field(default=1.0, gt=0, le=1)
    minimum: int = Field(default=1, ge=1)
    weighted: bool = False

    def round_size(self, site_count: int) -> int:
        """Return the number of sites chosen per round among ``site_count``."""
        return min(site_count, max(self.minimum, math.ceil(self.fraction * site_count)))


class AsynchronousConfig(_Strict):
    """Buffered asynchronous aggregation (FedBuff) in place of synchronous rounds.

    Each site trains from the latest global version it downloads and uploads
    when done. The service scales each update by ``(1 + staleness) **
    -staleness_exponent``, where staleness is the number of versions published
    since the one the site trained from, and publishes a new version from
    every ``buffer_size`` arrivals. ``training.rounds`` is then the number of
    versions the service publishes, and each site trains at most that often.
    """

    #: Arrivals per published version (K); at most the number of sites.
    buffer_size: int = Field(ge=1, strict=True)
    staleness_exponent: float = Field(default=0.5, ge=0, le=10)
    #: Updates staler than this many versions are rejected; None keeps all.
    max_staleness: int | None = Field(default=None, ge=0, strict=True)


class RoundConfig(_Strict):
    #: Seconds a round waits for uploads before it closes with the quorum. In
    #: asynchronous mode, the seconds one site update (download, training,
    #: upload) may take before the site counts as failed.
    deadline_seconds: float = Field(default=600.0, gt=0)
    #: Minimum number of uploads to finalize a round; default: a majority of
    #: the sites chosen for the round.
    quorum: int | None = Field(default=None, ge=1)
    participation: ParticipationConfig = ParticipationConfig()
    #: Set to aggregate asynchronously instead of in synchronous rounds.
    asynchronous: AsynchronousConfig | None = None


class AggregationConfig(_Strict):
    #: URL of a running aggregation service; when unset, ``medfed run``
    #: starts one on 127.0.0.1.
    url: str | None = None
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    #: DNS names and IP addresses, besides 127.0.0.1 and localhost, that the
    #: service's TLS certificate from ``medfed provision`` is valid for.
    hostnames: list[str] = Field(default_factory=list, max_length=64)
    #: Sustained requests per second allowed per site in deployment mode.
    rate_per_second: float = Field(default=20.0, gt=0, allow_inf_nan=False)
    #: Requests a site may send at once after being idle, in deployment mode.
    rate_burst: int = Field(default=50, ge=1)
    #: Concurrent connections and tasks before the service responds with 503.
    max_concurrency: int = Field(default=256, ge=1)


class EvaluationConfig(_Strict):
    """Federated evaluation of each global model.

    Attributes:
        histogram_bins: equal-width bins over [0, 1] for score histograms.
        operating_point: ``fixed`` predicts positive from score 0.5;
            ``youden`` picks, after every round, the threshold that maximizes
            Youden's J on the sites' pooled validation histograms, and reports
            accuracy at it. It needs a dataset with validation splits.
    """

    histogram_bins: int = Field(default=200, ge=2, le=10_000)
    operating_point: Literal["fixed", "youden"] = "fixed"


class TrackingConfig(_Strict):
    experiment: str = Field(default="medfed", min_length=1)
    #: Registered model name; defaults to the study id.
    registered_model: str | None = None


class StudyConfig(_Strict):
    """A whole study: who takes part, what is trained, and how."""

    study: str = Field(pattern=IDENTIFIER_PATTERN.pattern)
    description: str = ""
    data: DataConfig
    sites: list[SiteConfig] = Field(min_length=1, max_length=1000)
    model: ModelConfig
    training: TrainingConfig
    strategy: StrategyConfig = StrategyConfig()
    privacy: PrivacyConfig = PrivacyConfig(enabled=False)
    round: RoundConfig = RoundConfig()
    aggregation: AggregationConfig = AggregationConfig()
    compression: CompressionConfig = CompressionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _mode_shorthand(cls, value: object) -> object:
        # ``secure_aggregation: masking`` is short for ``{mode: masking}``.
        return {"mode": value} if isinstance(value, str) else value

    @field_validator("sites")
    @classmethod
    def _known_sources(
        cls, sites: list[SiteConfig], info: ValidationInfo
    ) -> list[SiteConfig]:
        # Only the file name is checked here, because the file lives at the
        # site, which may be another machine. ``check_local_data`` checks the
        # file itself when the sites run on this machine.
        data = info.data.get("data")
        if data is None or data.dataset != "heart_disease":
            return sites
        # Imported here because the dataset catalog sits with the site code.
        from medfed.sites.data.heart import HEART_FILES

        for site in sites:
            if site.source is not None and site.source not in HEART_FILES:
                raise ValueError(
                    f"source {site.source!r} of site {site.id!r} is not a "
                    "heart-disease file; choose one of "
                    + ", ".join(sorted(HEART_FILES))
                )
        return sites

    @model_validator(mode="after")
    def _check_sites(self) -> "StudyConfig":
        ids = [site.id for site in self.sites]
        duplicates = sorted({site for site in ids if ids.count(site) > 1})
        if duplicates:
            raise ValueError(
                f"site ids must be unique; repeated: {', '.join(duplicates)}"
            )
        if self.round.quorum is not None and self.round.quorum > len(self.sites):
            raise ValueError(
                f"round.quorum is {self.round.quorum} but the study has only "
                f"{len(self.sites)} sites"
            )
        round_size = self.round.participation.round_size(len(self.sites))
        if self.round.quorum is not None and self.round.quorum > round_size:
            raise ValueError(
                f"round.quorum is {self.round.quorum} but round.participation "
                f"chooses only {round_size} sites per round; lower the quorum or "
                "raise participation.fraction or participation.minimum"
            )
        if round_size < len(self.sites) and self.secure_aggregation.mode != "none":
            raise ValueError(
                f"round.participation chooses {round_size} of {len(self.sites)} "
                f"sites per round, but {self.secure_aggregation.mode} secure "
                "aggregation runs with every site of the study; set "
                "participation.fraction: 1 or secure_aggregation.mode: none"
            )
        try:
            self.compression.check(self.secure_aggregation.mode)
            self.secure_aggregation.check(
                len(self.sites), self.compression.build_codec()
            )
            if self.secure_aggregation.mode == "masking":
                self.secure_aggregation.check_key_exchange_deadline(
                    self.round.deadline_seconds
                )
        except ConfigError as error:
            raise ValueError(str(error)) from None
        if self.secure_aggregation.mode == "ckks" and (
            self.strategy.name == "scaffold" or self.strategy.local_layers
        ):
            raise ValueError(
                "ckks secure aggregation carries only the model delta, not "
                "SCAFFOLD's control deltas or a study's local layers; use "
                "secure_aggregation mode 'masking' or 'none' for them"
            )
        if (
            self.evaluation.operating_point == "youden"
            and self.data.dataset == "heart_disease"
        ):
            raise ValueError(
                "evaluation.operating_point 'youden' needs validation splits, and "
                "heart_disease sites keep only train and test splits; use 'fixed'"
            )
        return self

    @model_validator(mode="after")
    def _check_asynchronous(self) -> "StudyConfig":
        asynchronous = self.round.asynchronous
        if asynchronous is None:
            return self
        problem = asynchronous_conflict(self)
        if problem is not None:
            raise ValueError(f"round.asynchronous: {problem}")
        return self

    @model_validator(mode="after")
    def _check_strategy(self) -> "StudyConfig":
        # Imported here because the aggregation package pulls in Opacus for
        # central DP, which configs that never aggregate should not load.
        from medfed.aggregation.compatibility import build_study_strategy

        try:
            build_study_strategy(
                self.strategy_settings(),
                secure_aggregation=self.secure_aggregation.mode,
            )
        except ConfigError as error:
            raise ValueError(f"strategy: {error}") from None
        return self

    @model_validator(mode="after")
    def _check_local_layers(self) -> "StudyConfig":
        if not self.strategy.local_layers:
            return self
        # Imported here because building a model loads torch, which configs
        # without local layers do not need.
        from medfed.contract.models import build_model

        try:
            model = build_model(self.model.name, **self.model.params)
            check_local_patterns(
                self.strategy.local_layers,
                list(model.state_dict()),
                model=f"model {self.model.name!r}",
            )
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return self

    def strategy_settings(self) -> dict[str, Any]:
        """Return the strategy as the aggregation service stores it.

        ``total_sites`` defaults to the number of sites in the study for the
        strategy and wrappers that take it (scaffold, central_dp).
        """
        return {
            "strategy": self.strategy.name,
            "strategy_params": self.strategy.params,
            "wrappers": [[w.name, w.params] for w in self.strategy.wrappers],
            "total_sites": len(self.sites),
            "local_layers": list(self.strategy.local_layers),
        }

    @property
    def quorum(self) -> int:
        """Return the uploads a round needs: the configured quorum, or a
        majority of the sites chosen per round."""
        if self.round.quorum is not None:
            return self.round.quorum
        return self.round.participation.round_size(len(self.sites)) // 2 + 1

    def site_budget(self, site_id: str) -> tuple[float, float]:
        """Return the (epsilon, delta) budget of ``site_id`` for the study."""
        site = next(s for s in self.sites if s.id == site_id)
        epsilon = site.epsilon if site.epsilon is not None else self.privacy.epsilon
        delta = site.delta if site.delta is not None else self.privacy.delta
        assert epsilon is not None and delta is not None
        return epsilon, delta


def asynchronous_conflict(config: StudyConfig) -> str | None:
    """Return why ``config`` cannot run in asynchronous mode, or None.

    The conflicts are the settings that assume every site trains from the
    same global version in each round.
    """
    asynchronous = config.round.asynchronous
    assert asynchronous is not None
    sites = len(config.sites)
    if asynchronous.buffer_size > sites:
        return (
            f"buffer_size {asynchronous.buffer_size} exceeds the {sites} sites of "
            f"the study, so no version could be published; set it to at most {sites}"
        )
    mode = config.secure_aggregation.mode
    if mode != "none":
        return (
            f"{mode} secure aggregation sums a fixed cohort of sites per round, "
            "and asynchronous updates arrive one at a time from different "
            "versions; set secure_aggregation: none or remove round.asynchronous"
        )
    if config.strategy.name == "scaffold":
        return (
            "scaffold updates its control variates once per synchronous round "
            "from every participant; use fedavg, fedprox or a server optimizer "
            "(fedadam, fedyogi, fedadagrad), or remove round.asynchronous"
        )
    wrappers = [wrapper.name for wrapper in config.strategy.wrappers]
    if "central_dp" in wrappers:
        return (
            "central_dp accounts for a sample of sites per round, and a buffer "
            "may hold two updates of one site, so its noise would not match the "
            "sensitivity; use record-level DP at the sites (privacy.enabled) "
            "or remove round.asynchronous"
        )
    if config.round.participation.round_size(sites) < sites:
        return (
            "round.participation chooses sites per synchronous round, and in "
            "asynchronous mode every site trains whenever it is ready; set "
            "participation.fraction: 1 or remove round.asynchronous"
        )
    if config.round.quorum is not None:
        return (
            "round.quorum applies to synchronous rounds; remove it, because "
            "buffer_size sets how many updates make a version"
        )
    # Imported here for the same reason as in _check_strategy.
    from medfed.aggregation.asynchronous import buffer_size_conflict

    return buffer_size_conflict(
        asynchronous.buffer_size,
        [(wrapper.name, wrapper.params) for wrapper in config.strategy.wrappers],
    )


def parse_study_config(raw: object, *, source: str = "study config") -> StudyConfig:
    """Validate a decoded config mapping.

    Raises:
        ConfigError: naming the first invalid keys, their values and the rule.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source} must be a mapping of keys to values, got {type(raw).__name__}"
        )
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(
            f"{source} is invalid: {describe_validation_error(error)}"
        ) from None


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate the study config at ``path``.

    Raises:
        ConfigError: the file is missing, is not YAML, or fails validation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"study config {str(path)!r} not found; pass the path of a YAML file"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read study config {str(path)!r}: {error}") from None
    try:
        raw = yaml.safe_load(text)
    # PyYAML raises ValueError for an integer longer than Python's
    # int_max_str_digits (4300 by default) and RecursionError for deep nesting.
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        raise ConfigError(
            f"study config {str(path)!r} is not valid YAML: {error}"
        ) from None
    return parse_study_config(raw, source=f"study config {str(path)!r}")


def describe_validation_error(error: ValidationError, limit: int = 3) -> str:
    """Format pydantic errors as ``key: problem (got value)`` phrases."""
    parts = []
    for item in error.errors()[:limit]:
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}; remove it or check its spelling")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if not key:
            # A check across sections has no location, and its message
            # starts with the keys it concerns.
            parts.append(message)
            continue
        value = item.get("input")
        shown = (
            ""
            if isinstance(value, dict | list) or value is None
            else f" (got {value!r})"
        )
        parts.append(f"{key}: {message}{shown}")
    more = len(error.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
