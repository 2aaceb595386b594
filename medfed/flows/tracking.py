"""MLflow records of a study: one run, per-round metrics, the model version.

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else an SQLite file
``mlflow.db`` in the working directory.

How rounds run is recorded as params ``round_*``, ``participation_*`` and,
for asynchronous studies, ``asynchronous_*`` (see ``round_params``).
Secure aggregation is recorded as params ``secure_aggregation_*`` (the mode
and its parameters, see ``secure_aggregation_params``) and, under masking,
as per-round metrics ``SITE.secagg_*`` (the protocol's bytes and seconds at
each site, see ``MaskingRoundCost``).
"""

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors.numpy import save_file

from medfed.contract.codecs.base import Codec
from medfed.contract.config import StudyConfig
from medfed.contract.metrics import EvaluationAggregates
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.secagg.int8_ring import Int8RingEncoding
from medfed.contract.secagg.ring import FixedPointEncoding
from medfed.errors import ConfigError

__all__ = [
    "StudyTracker",
    "round_params",
    "secure_aggregation_params",
    "tracking_uri",
]

logger = logging.getLogger(__name__)


class _NoSignatureNotice(logging.Filter):
    """A filter that drops MLflow's notice that it inferred no model signature.

    medfed logs its models without an input example, because an example
    would be patient records. MLflow then has nothing to infer a signature
    from, and it logs a warning on every registration.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to infer model signature")


_MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def tracking_uri() -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    )


def round_params(config: StudyConfig) -> dict[str, Any]:
    """Return the MLflow params that describe how the study's rounds run.

    Synchronous studies get their quorum and participation, asynchronous ones
    their buffer and staleness settings.
    """
    rounds = config.round
    asynchronous = rounds.asynchronous
    params: dict[str, Any] = {
        "round_mode": "synchronous" if asynchronous is None else "asynchronous",
        "round_deadline_seconds": rounds.deadline_seconds,
    }
    if asynchronous is None:
        params["round_quorum"] = config.quorum
        params["participation_fraction"] = rounds.participation.fraction
        params["participation_minimum"] = rounds.participation.minimum
        params["participation_weighted"] = rounds.participation.weighted
    else:
        params["asynchronous_buffer_size"] = asynchronous.buffer_size
        params["asynchronous_staleness_exponent"] = asynchronous.staleness_exponent
        params["asynchronous_max_staleness"] = asynchronous.max_staleness
    return params


def secure_aggregation_params(
    secure: SecureAggregationConfig,
    *,
    site_count: int,
    codec: Codec | None = None,
    deadline_seconds: float | None = None,
) -> dict[str, Any]:
    """Return the secure-aggregation mode in force and its parameters.

    Masking gives the resolved threshold, site count, ring, clip, maximum
    weight, rounding and the ring encoding with its scale (``fractional_bits``
    for fixed point, ``int8_scale`` for int8 levels, chosen by ``codec``).
    With the round's ``deadline_seconds`` it also gives the resolved
    ``key_exchange_seconds``.
    CKKS gives its encryption parameters, clip and maximum weight.
    """
    params: dict[str, Any] = {"secure_aggregation_mode": secure.mode}
    if secure.mode == "masking":
        encoding = secure.encoding(site_count, codec)
        params |= {
            "secure_aggregation_threshold": secure.resolved_threshold(site_count),
            "secure_aggregation_sites": site_count,
            "secure_aggregation_ring_bits": encoding.ring_bits,
            "secure_aggregation_clip": encoding.clip,
            "secure_aggregation_max_weight": encoding.max_weight,
            "secure_aggregation_rounding": encoding.rounding,
        }
        if isinstance(encoding, Int8RingEncoding):
            params["secure_aggregation_encoding"] = "int8"
            params["secure_aggregation_int8_scale"] = encoding.scale
        elif isinstance(encoding, FixedPointEncoding):
            params["secure_aggregation_encoding"] = "fixed_point"
            params["secure_aggregation_fractional_bits"] = encoding.fractional_bits
        if deadline_seconds is not None:
            params["secure_aggregation_key_exchange_seconds"] = (
                secure.resolved_key_exchange_seconds(deadline_seconds)
            )
    elif secure.mode == "ckks":
        ckks = secure.ckks_parameters()
        params |= {
            "secure_aggregation_poly_modulus_degree": ckks.poly_modulus_degree,
            "secure_aggregation_coeff_mod_bit_sizes": ",".join(
                str(bits) for bits in ckks.coeff_mod_bit_sizes
            ),
            "secure_aggregation_scale_bits": ckks.scale_bits,
            "secure_aggregation_clip": secure.clip,
            "secure_aggregation_max_weight": secure.max_weight,
        }
    return params


def _check_resumable(run_id: str, study: str) -> None:
    """Raise unless the tracking store has run ``run_id`` and it is not deleted.

    Raises:
        ConfigError: the run is missing or deleted.
    """
    try:
        stage = MlflowClient().get_run(run_id).info.lifecycle_stage
    except MlflowException:
        raise ConfigError(
            f"MLflow run {run_id} of study {study!r} is not in the tracking store "
            f"{tracking_uri()}; point MLFLOW_TRACKING_URI at the store the study "
            "started in, or start a new study in a new --work-dir"
        ) from None
    if stage == "deleted":
        raise ConfigError(
            f"MLflow run {run_id} of study {study!r} is deleted; restore it with "
            f"'mlflow runs restore --run-id {run_id}' and resume again, or start a "
            "new study in a new --work-dir"
        )


#: Metrics logged with the model version as their step. Two for synchronous
#: rounds, because ``log_round`` leaves out a metric that is NaN.
_VERSION_METRICS = (
    "pooled.decision_threshold",
    "pooled.test_loss",
    "asynchronous.published_version",
)


class StudyTracker:
    """Logs one study to MLflow as one run."""

    def __init__(
        self, config: StudyConfig, config_text: str, run_id: str | None = None
    ) -> None:
        self.config = config
        mlflow.set_tracking_uri(tracking_uri())
        experiment = mlflow.set_experiment(config.tracking.experiment)
        if run_id is None:
            run = mlflow.start_run(
                experiment_id=experiment.experiment_id, run_name=config.study
            )
        else:
            _check_resumable(run_id, config.study)
            run = mlflow.start_run(run_id=run_id)
        self.run_id = run.info.run_id
        if run_id is None:
            mlflow.set_tags(
                {"medfed.study": config.study, "medfed.dataset": config.data.dataset}
            )
            mlflow.log_text(config_text, "study_config.yaml")

    def log_params(self, site_privacy: Mapping[str, Mapping[str, Any]]) -> None:
        """Log the study's parameters, with each site's DP parameters."""
        training = self.config.training
        params: dict[str, Any] = {
            "study": self.config.study,
            "strategy": self.config.strategy.name,
            "strategy_params": json.dumps(self.config.strategy.params, sort_keys=True),
            "model": self.config.model.name,
            "rounds": training.rounds,
            "local_epochs": training.local_epochs,
            "batch_size": training.batch_size,
            "learning_rate": training.learning_rate,
            "logit_adjustment": training.logit_adjustment,
            "sites": ",".join(site.id for site in self.config.sites),
            "dp_enabled": self.config.privacy.enabled,
            "dp_accountant": self.config.privacy.accountant,
            "compression_codec": self.config.compression.codec,
            "compression_params": json.dumps(
                self.config.compression.params, sort_keys=True
            ),
            "compression_zstd": self.config.compression.zstd,
            "compression_zstd_level": self.config.compression.envelope_zstd_level,
            "compression_error_feedback": self.config.compression.error_feedback,
            **round_params(self.config),
            **secure_aggregation_params(
                self.config.secure_aggregation,
                site_count=len(self.config.sites),
                codec=self.config.compression.build_codec(),
                deadline_seconds=self.config.round.deadline_seconds,
            ),
        }
        for site, values in site_privacy.items():
            for key, value in values.items():
                params[f"{site}.{key}"] = value
        existing = MlflowClient().get_run(self.run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in existing})

    def log_round(
        self,
        step: int,
        evaluations: Mapping[str, EvaluationAggregates],
        pooled: EvaluationAggregates,
        reports: Mapping[str, Mapping[str, Any]],
        *,
        threshold: float = 0.5,
    ) -> None:
        """Log one round's metrics at ``step`` (the new model version).

        Accuracies count a record as positive from score ``threshold`` on.
        """
        metrics: dict[str, float] = {
            "pooled.decision_threshold": threshold,
            "pooled.test_accuracy": pooled.accuracy,
            "pooled.test_auc": pooled.auc,
            "pooled.test_loss": pooled.loss,
        }
        for site, result in evaluations.items():
            metrics[f"{site}.test_accuracy"] = result.accuracy
            metrics[f"{site}.test_auc"] = result.auc
            metrics[f"{site}.test_loss"] = result.loss
        for site, report in reports.items():
            metrics[f"{site}.bytes_uploaded"] = float(report["bytes_uploaded"])
            metrics[f"{site}.bytes_downloaded"] = float(report["bytes_downloaded"])
            if report.get("dense_float32_bytes"):
                metrics[f"{site}.compression_ratio"] = (
                    report["dense_float32_bytes"] / report["bytes_uploaded"]
                )
            if report.get("epsilon_spent") is not None:
                metrics[f"{site}.epsilon_spent"] = float(report["epsilon_spent"])
            metrics |= _masking_cost_metrics(site, report)
        finite = {key: value for key, value in metrics.items() if value == value}
        # Asynchronous logging keeps the tracking store's writes off the
        # round's critical path; ``finish`` waits for them.
        mlflow.log_metrics(finite, step=step, synchronous=False)

    def log_asynchronous(
        self,
        sites: Mapping[str, Mapping[str, Any]],
        version_seconds: list[float],
        *,
        first_version: int = 1,
    ) -> None:
        """Log an asynchronous study's updates per site and its version times.

        Per site: ``<site>.asynchronous_updates`` and the mean and maximum
        staleness of its updates. ``asynchronous.version_seconds`` has one
        step per version published in this run, numbered by the version from
        ``first_version`` on, so a resumed run adds steps after the earlier
        ones instead of overwriting them.
        """
        metrics: dict[str, float] = {}
        for site, entry in sites.items():
            staleness = list(entry["staleness"])
            metrics[f"{site}.asynchronous_updates"] = float(entry["updates"])
            if staleness:
                metrics[f"{site}.mean_staleness"] = sum(staleness) / len(staleness)
                metrics[f"{site}.max_staleness"] = float(max(staleness))
        mlflow.log_metrics(metrics, synchronous=False)
        for step, seconds in enumerate(version_seconds, start=first_version):
            mlflow.log_metric(
                "asynchronous.version_seconds", seconds, step=step, synchronous=False
            )

    def log_published(self, version: int) -> None:
        """Log that the service published ``version`` of an asynchronous study."""
        mlflow.log_metric(
            "asynchronous.published_version", version, step=version, synchronous=False
        )

    def recorded_version(self) -> int:
        """Return the highest model version this run logged metrics at, or 0.

        Synchronous rounds log ``pooled.decision_threshold`` and
        ``pooled.test_loss`` at each new version, and asynchronous studies
        ``asynchronous.published_version``. Both are
        logged after the service publishes the version, so an intact service
        is never behind this figure.
        """
        client = MlflowClient()
        steps = [
            metric.step
            for key in _VERSION_METRICS
            for metric in client.get_metric_history(self.run_id, key)
        ]
        return max(steps, default=0)

    def log_event(self, name: str, text: str) -> None:
        mlflow.set_tag(f"medfed.event.{name}", text[:5000])

    def log_resume(self, text: str) -> None:
        """Tag the run with one more resume, ``medfed.event.resume<n>`` from 1."""
        tags = MlflowClient().get_run(self.run_id).data.tags
        count = sum(1 for key in tags if key.startswith("medfed.event.resume"))
        self.log_event(f"resume{count + 1}", text)

    def register_model(
        self,
        weights: Mapping[str, Any],
        *,
        version: int,
        round_number: int,
        sites: list[str],
        lineage: Mapping[str, str],
    ) -> str:
        """Log the global model (safetensors + model-from-code) and register it.

        Returns the registered model version.
        """
        name = self.config.tracking.registered_model or self.config.study
        with tempfile.TemporaryDirectory() as folder:
            weights_path = Path(folder) / "weights.safetensors"
            spec_path = Path(folder) / "model_spec.json"
            save_file(dict(weights), str(weights_path))
            spec_path.write_text(
                json.dumps(
                    {"name": self.config.model.name, "params": self.config.model.params}
                ),
                encoding="utf-8",
            )
            notice = _NoSignatureNotice()
            mlflow_logger = logging.getLogger("mlflow.pyfunc")
            mlflow_logger.addFilter(notice)
            try:
                info = mlflow.pyfunc.log_model(
                    name="global_model",
                    python_model=str(_MODEL_CODE),
                    artifacts={"weights": str(weights_path), "spec": str(spec_path)},
                    registered_model_name=name,
                    pip_requirements=["medfed", "torch==2.13.0", "safetensors"],
                )
            finally:
                mlflow_logger.removeFilter(notice)
        registered = str(info.registered_model_version)
        client = MlflowClient()
        tags = {
            "medfed.study": self.config.study,
            "medfed.round": str(round_number),
            "medfed.model_version": str(version),
            "medfed.sites": ",".join(sites),
            "medfed.strategy": self.config.strategy.name,
            **lineage,
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, registered, key, value)
        logger.info(
            "registered model %s version %s for study %s",
            name,
            registered,
            self.config.study,
        )
        return registered

    def finish(self, status: str = "FINISHED") -> None:
        mlflow.flush_async_logging()
        mlflow.end_run(status=status)


def _masking_cost_metrics(site: str, report: Mapping[str, Any]) -> dict[str, float]:
    """Return a site's masking cost for the round, or nothing outside masking.

    ``secagg_bytes_uploaded_total`` is the masked envelope plus the protocol
    messages the site sent.
    """
    if report.get("secagg_wall_seconds") is None:
        return {}
    sent = float(report["secagg_message_bytes_sent"])
    return {
        f"{site}.secagg_message_bytes_sent": sent,
        f"{site}.secagg_message_bytes_received": float(
            report["secagg_message_bytes_received"]
        ),
        f"{site}.secagg_bytes_uploaded_total": float(report["bytes_uploaded"]) + sent,
        f"{site}.secagg_wall_seconds": float(report["secagg_wall_seconds"]),
        f"{site}.secagg_compute_seconds": float(report["secagg_compute_seconds"]),
    }
