"""What a site does in a round: prepare data, train under DP, upload, evaluate.

``SiteRunner`` owns one site's state directory, which contains everything the
site keeps between rounds (preprocessed data, the privacy ledger, SCAFFOLD's
control variate, the layers the study keeps local). Only model updates,
sample counts, aggregate metrics and privacy spent leave the site.
"""

import hashlib
import json
import logging
import math
import os
import secrets
import threading
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.compatibility import build_study_strategy
from medfed.aggregation.strategies import Strategy
from medfed.aggregation.strategies.scaffold import CONTROL_DELTA, CONTROL_VARIATE
from medfed.contract.codecs.ckks import CkksEncryptor
from medfed.contract.config import StudyConfig
from medfed.contract.extras import pack_extras, scale_extras_for_masking
from medfed.contract.kits import KitFiles
from medfed.contract.local_layers import is_local
from medfed.contract.metrics import EvaluationAggregates
from medfed.contract.models import build_model
from medfed.contract.secagg import MaskingSite, VectorLayout
from medfed.contract.secagg.ckks import CkksSiteContext, round_for_release
from medfed.contract.signing import Ed25519Signer
from medfed.contract.wire import encode_envelope
from medfed.errors import (
    BudgetExceededError,
    ConfigError,
    LedgerError,
    SecureAggregationError,
    ServiceError,
)
from medfed.sites.advertisement_keys import load_advertisement_keys
from medfed.sites.ckks_keys import load_secret_context
from medfed.sites.client import AggregationClient, DownloadedModel
from medfed.sites.compression import build_update_encoder
from medfed.sites.data import check_site_source, load_split, prepare_site_data
from medfed.sites.data.augment import RandomAffine
from medfed.sites.data.root import resolve_data_root
from medfed.sites.error_feedback import RESIDUAL_FILE_NAME as ERROR_FEEDBACK_FILE_NAME
from medfed.sites.error_feedback import ErrorFeedback
from medfed.sites.personalization import LocalLayerStore, merge_global
from medfed.sites.privacy import LedgerTerms, PrivacyLedger, ledger_advice
from medfed.sites.scaffold import ScaffoldSite
from medfed.sites.secagg_client import (
    BackgroundMaskingRound,
    MaskingClient,
    MaskingRoundCost,
)
from medfed.sites.training import (
    GradientCorrection,
    LocalTrainingSettings,
    TrainingResult,
    dp_sample_rate,
    dp_steps_per_epoch,
    train_locally,
)

__all__ = ["SiteRoundReport", "SiteRunner", "connect_site", "initial_model_weights"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteRoundReport:
    """A site's report to the coordinator after a round."""

    site: str
    round: int
    #: "uploaded" or "rejected_budget"; in asynchronous mode also
    #: "study_finished" and "rejected_stale" (the service rejected the update
    #: as staler than ``max_staleness``).
    status: str
    message: str
    train_records: int
    epsilon_spent: float | None
    noise_multiplier: float | None
    bytes_uploaded: int
    bytes_downloaded: int
    receipt: str | None = None
    #: Size of the update as dense float32 values, the baseline of the
    #: compression ratio.
    dense_float32_bytes: int = 0
    #: Masking only: the protocol's cost to the site beside ``bytes_uploaded``
    #: (the masked envelope); see ``MaskingRoundCost``. None in other modes.
    secagg_message_bytes_sent: int | None = None
    secagg_message_bytes_received: int | None = None
    secagg_wall_seconds: float | None = None
    secagg_compute_seconds: float | None = None
    #: Asynchronous mode only: the global version the site trained from, the
    #: staleness the service gave the update, and the version it published.
    base_version: int | None = None
    staleness: int | None = None
    published_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


KIT_ENV_VAR = "MEDFED_KIT_DIR"
#: The file in a study's state folder that contains the site's secret DP noise
#: key, readable by the site's user only.
NOISE_KEY_FILE = "dp-noise.key"
NOISE_KEY_BYTES = 32


_connections: dict[
    tuple[str, str | None], tuple[AggregationClient, Ed25519Signer | None]
] = {}
_connections_lock = threading.Lock()


def connect_site(
    aggregation_url: str,
) -> tuple[AggregationClient, Ed25519Signer | None]:
    """Return this site's connection to the aggregation service.

    When ``MEDFED_KIT_DIR`` names the site's startup kit (deployment mode),
    the client authenticates with the kit's certificate and uploads are
    signed with its key. Otherwise (local mode) both are plain.

    The connection is opened once per service URL and kit and then reused
    for the life of the process: building an ``httpx.Client`` loads a CA
    bundle (about 30 ms here), which would otherwise be paid by every site
    task of every round. Callers must not close the returned client.
    """
    kit = os.environ.get(KIT_ENV_VAR) or None
    key = (aggregation_url, kit)
    with _connections_lock:
        if key not in _connections:
            if kit is None:
                _connections[key] = (AggregationClient(aggregation_url), None)
            else:
                kit_dir = Path(kit)
                signer = Ed25519Signer.from_file(kit_dir / KitFiles.SIGNING_KEY)
                client = AggregationClient.with_kit(aggregation_url, kit_dir)
                _connections[key] = (client, signer)
        return _connections[key]


def initial_model_weights(config: StudyConfig) -> dict[str, np.ndarray]:
    """Build the study's model with the study seed and return its weights."""
    torch.manual_seed(config.training.seed)
    model = build_model(config.model.name, **config.model.params)
    return {
        key: value.detach().numpy().copy() for key, value in model.state_dict().items()
    }


@dataclass(frozen=True)
class _LocalUpdate:
    """One local training: its result, the epsilon spent so far (None without
    DP), every trained weight and the update of the shared ones."""

    result: TrainingResult
    epsilon: float | None
    trained: dict[str, np.ndarray]
    delta: dict[str, np.ndarray]


class SiteRunner:
    """One site's side of a study.

    Args:
        config: the study config.
        site_id: this site's identifier (validated by the config schema).
        state_dir: the site's private folder; nothing in it leaves the site.
        data_root: the site's data folder; resolved as documented in
            ``medfed.sites.data.root`` when None.
        signer: signs every upload with the site's Ed25519 key from its
            startup kit; None sends unsigned envelopes (local mode).
        kit_dir: the site's startup kit, for its CKKS secret context and its
            masking key advertisements; ``MEDFED_KIT_DIR`` when None, and no
            kit (local mode) when that is unset too.
    """

    def __init__(
        self,
        config: StudyConfig,
        site_id: str,
        state_dir: Path,
        data_root: Path | None = None,
        signer: Ed25519Signer | None = None,
        kit_dir: Path | None = None,
    ) -> None:
        if site_id not in {site.id for site in config.sites}:
            raise ValueError(f"site {site_id!r} is not part of study {config.study!r}")
        self.config = config
        self.site_id = site_id
        self.signer = signer
        if kit_dir is None and os.environ.get(KIT_ENV_VAR):
            kit_dir = Path(os.environ[KIT_ENV_VAR])
        self.kit_dir = kit_dir
        self.study_dir = state_dir / "studies" / config.study
        self.data_dir = self.study_dir / "data"
        self.ledger_path = self.study_dir / "privacy-ledger.json"
        #: SCAFFOLD's site control variate ``c_i``, as of the last accepted upload.
        self.control_variate_path = self.study_dir / "scaffold-control.safetensors"
        #: The layers the study keeps local, as of the last accepted upload.
        self.local_layers_path = self.study_dir / "local-layers.safetensors"
        self.data_root = data_root or resolve_data_root(config.data.root)

    # Data

    def prepare(self) -> dict[str, Any]:
        """Preprocess the site's data once; return its manifest."""
        manifest_path = self.data_dir / "manifest.json"
        if manifest_path.exists():
            manifest: dict[str, Any] = json.loads(
                manifest_path.read_text(encoding="utf-8")
            )
            return manifest
        return prepare_site_data(
            self.config, self.site_id, self.data_root, self.data_dir
        )

    def train_label_counts(self) -> tuple[int, int]:
        """Return the negative and positive labels of the training split."""
        counts = self.prepare()["splits"]["train"]["label_counts"]
        return int(counts.get("0", 0)), int(counts.get("1", 0))

    def logit_offset(self, ledger: PrivacyLedger | None) -> float:
        """Return the offset that logit adjustment adds to this site's logits.

        It is ``tau * log((positives + 1) / (negatives + 1))``: from the
        ledger's noisy counts under DP, from the exact counts otherwise.
        """
        tau = self.config.training.logit_adjustment
        if tau == 0:
            return 0.0
        if ledger is not None:
            assert ledger.noisy_label_counts is not None
            negatives, positives = ledger.noisy_label_counts
        else:
            negatives, positives = self.train_label_counts()
        return tau * math.log((positives + 1) / (negatives + 1))

    def check_source(self) -> None:
        """Check the site's raw data file unless its data is already preprocessed.

        Raises:
            ConfigError, DataError: as ``check_site_source``.
        """
        if (self.data_dir / "manifest.json").exists():
            return
        check_site_source(self.config, self.site_id, self.data_root)

    def dataset_fingerprint(self) -> str:
        """Return a SHA-256 over the manifest: identifies the data, reveals none of it."""
        manifest = self.prepare()
        return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()

    def check_model_input(self) -> None:
        """Check that the study's model accepts the shape of the site's records.

        The model runs on one all-zero record with the training split's
        shape, so only the shape of the site's data is used, and the error
        names only that shape.

        Raises:
            ConfigError: the model rejects records of that shape.
        """
        inputs, _ = load_split(self.config, self.data_dir, "train")
        shape = tuple(inputs.shape[1:])
        model_config = self.config.model
        # Building draws initial weights; fork_rng keeps the torch random
        # state of the site's training as it was.
        with torch.random.fork_rng(devices=[]):
            model = build_model(model_config.name, **model_config.params)
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros((1, *shape), dtype=inputs.dtype))
        except (RuntimeError, ValueError) as error:
            hint = "fix model.params for this data"
            if len(shape) == 1 and "in_features" in model_config.params:
                hint = f"set model.params.in_features to {shape[0]}"
            reason = " ".join(str(error).split())
            # The coordinator prefixes the site id when it reports the error.
            raise ConfigError(
                f"model {model_config.name!r} does not accept the records of this "
                f"site, which have shape {shape} after preprocessing ({reason}); "
                f"{hint}"
            ) from None

    # Privacy

    def ledger(self, train_records: int) -> PrivacyLedger | None:
        """Load the site's ledger for this study, creating it on first use.

        Under logit adjustment a new ledger also counts the training labels
        once, with noise.

        Raises:
            ConfigError: the study uses logit adjustment, but the ledger was
                created without label counts.
        Raises:
            LedgerError: the ledger is invalid or was calibrated under other
                terms than the config's. Also raised when the config disables
                DP although the study has a ledger, and when the ledger is
                missing but the site stores state that only an accepted upload
                writes.
        """
        privacy = self.config.privacy
        if not privacy.enabled:
            if self.ledger_path.exists():
                raise LedgerError(
                    f"study {self.config.study!r} has a privacy ledger at "
                    f"{self.ledger_path}, so it started with DP, but its config sets "
                    "privacy.enabled: false, which would release updates without "
                    "noise. Set privacy.enabled back to true with the study's budget, "
                    "or run without DP as a new study with its own name"
                )
            return None
        adjusting = self.config.training.logit_adjustment > 0
        terms = self._ledger_terms(train_records)
        if self.ledger_path.exists():
            existing = PrivacyLedger.load(self.ledger_path)
            existing.check_terms(terms, self.ledger_path)
            if adjusting and existing.noisy_label_counts is None:
                raise ConfigError(
                    f"site {self.site_id!r} cannot use training.logit_adjustment "
                    f"in study {self.config.study!r}: its privacy ledger "
                    f"{self.ledger_path} was created without label counts. Set "
                    "logit_adjustment back to 0, or run the study under a new name"
                )
            return existing
        self._check_no_earlier_upload()
        training = self.config.training
        ledger = PrivacyLedger.calibrate(
            study=terms.study,
            site=terms.site,
            epsilon=terms.epsilon_budget,
            delta=terms.delta,
            sample_rate=terms.sample_rate,
            steps_per_round=terms.steps_per_round,
            planned_rounds=training.rounds,
            max_grad_norm=terms.max_grad_norm,
            accountant=terms.accountant,
            label_counts=self.train_label_counts() if adjusting else None,
            label_count_noise=privacy.label_count_noise if adjusting else None,
        )
        ledger.save(self.ledger_path)
        logger.info(
            "site %s calibrated noise multiplier %.4f for epsilon %s over %d rounds",
            self.site_id, ledger.noise_multiplier, terms.epsilon_budget,
            training.rounds,
        )  # fmt: skip
        return ledger

    def _ledger_terms(self, train_records: int) -> LedgerTerms:
        """Return the accounting terms that the config gives this site."""
        epsilon, delta = self.config.site_budget(self.site_id)
        training = self.config.training
        return LedgerTerms(
            study=self.config.study,
            site=self.site_id,
            epsilon_budget=epsilon,
            delta=delta,
            accountant=self.config.privacy.accountant,
            max_grad_norm=self.config.privacy.max_grad_norm,
            sample_rate=dp_sample_rate(train_records, training.batch_size),
            steps_per_round=training.local_epochs
            * dp_steps_per_epoch(train_records, training.batch_size),
        )

    def _check_no_earlier_upload(self) -> None:
        """Raise LedgerError if the site's state shows an accepted upload.

        These files are written only after the service accepted an update, so
        a missing ledger next to one of them was deleted, not never created.
        """
        written_after_upload = [
            self.control_variate_path,
            self.local_layers_path,
            self.study_dir / ERROR_FEEDBACK_FILE_NAME,
        ]
        evidence = [path.name for path in written_after_upload if path.exists()]
        if evidence:
            raise LedgerError(
                f"privacy ledger {self.ledger_path} is missing, but the site "
                f"already uploaded updates in study {self.config.study!r} (it "
                f"stores {', '.join(evidence)}); " + ledger_advice(self.config.study)
            )

    def check_ledger_against_service(
        self, client: AggregationClient, ledger: PrivacyLedger, round_number: int
    ) -> None:
        """Raise LedgerError if the service stores an update the ledger does not charge.

        The site requests the status of each round up to ``round_number``
        that its ledger does not list. A ledger that was deleted, rolled back
        to an older copy or replaced lists fewer rounds than the site
        uploaded, and training on it would undercount. A service that claims
        uploads the site never made can only stop the site, never make it
        spend more.

        Under masking the site sends its masked envelope to the round's
        upload route, so it is in ``uploaded`` like any other upload.
        """
        charged = set(ledger.rounds_spent)
        for earlier in range(round_number + 1):
            if earlier in charged:
                continue
            try:
                status = client.round_status(self.config.study, earlier)
            except ServiceError as error:
                if error.status_code == 404:
                    continue
                raise
            if self.site_id in status["uploaded"]:
                raise LedgerError(
                    f"privacy ledger {self.ledger_path} charges no update for round "
                    f"{earlier} of study {self.config.study!r}, but the aggregation "
                    "service accepted one from this site, so the ledger was rolled "
                    "back, replaced or recreated and undercounts what the site "
                    "released; " + ledger_advice(self.config.study)
                )

    def check_asynchronous_ledger(
        self, client: AggregationClient, ledger: PrivacyLedger
    ) -> None:
        """Raise LedgerError if the service accepted more updates than the ledger charges.

        Each update the service accepts from a site in an asynchronous study
        has its own update number, so the ledger must charge at least as many
        distinct update numbers as the service lists arrivals from the site.
        """
        status = client.asynchronous_status(self.config.study)
        accepted = sum(
            1 for arrival in status["arrivals"] if arrival["site"] == self.site_id
        )
        charged = len(set(ledger.rounds_spent))
        if accepted > charged:
            raise LedgerError(
                f"privacy ledger {self.ledger_path} charges {charged} updates of "
                f"study {self.config.study!r}, but the aggregation service accepted "
                f"{accepted} from this site, so the ledger was rolled back, "
                "replaced or recreated and undercounts what the site released; "
                + ledger_advice(self.config.study)
            )

    # Rounds

    def train_round(
        self, client: AggregationClient, round_number: int
    ) -> SiteRoundReport:
        """Train on the round's base model and upload the update.

        A round that would exceed the site's privacy budget is rejected before
        any training, so nothing is uploaded and the report gives the reason. In a study
        with ``secure_aggregation: masking`` the upload runs the masking
        protocol with the other sites (``_upload_masked``).
        """
        self.prepare()
        inputs, labels = load_split(self.config, self.data_dir, "train")
        records = int(labels.shape[0])
        ledger = self.ledger(records)
        if ledger is not None:
            self.check_ledger_against_service(client, ledger, round_number)
            try:
                ledger.check_next_round(round_number)
            except BudgetExceededError as error:
                ledger.save(self.ledger_path)
                logger.warning("%s", error)
                client.report_privacy(
                    self.config.study,
                    round_number,
                    self.site_id,
                    status="refused",
                    epsilon_spent=ledger.epsilon_spent(),
                    delta=ledger.delta,
                    message=str(error),
                )
                return SiteRoundReport(
                    site=self.site_id,
                    round=round_number,
                    status="rejected_budget",
                    message=str(error),
                    train_records=records,
                    epsilon_spent=ledger.epsilon_spent(),
                    noise_multiplier=ledger.noise_multiplier,
                    bytes_uploaded=0,
                    bytes_downloaded=0,
                )

        # Under masking the key setup starts now, so it overlaps training.
        masking = self._start_masking(client, round_number)
        try:
            base = client.download_round_model(self.config.study, round_number)
            shared = self._shared_names(base.weights)
            scaffold = self._scaffold(client, base, shared)
            training_run = self._train_update(
                base,
                shared,
                (inputs, labels),
                ledger,
                round_number,
                randomness=self._randomness(round_number),
                correct_gradients=scaffold.correct_gradients if scaffold else None,
            )
            result, epsilon = training_run.result, training_run.epsilon
            trained, delta = training_run.trained, training_run.delta
            extras: dict[str, dict[str, np.ndarray]] = {}
            new_control = None
            if scaffold is not None:
                training = self.config.training
                new_control, extras[CONTROL_DELTA] = scaffold.control_update(
                    {key: trained[key] for key in shared},
                    local_steps=max(result.steps, 1),
                    learning_rate=training.round_learning_rate(round_number),
                    momentum=training.momentum,
                )

            def commit_site_state() -> None:
                # Runs only once the service accepted the upload, so a rejected
                # upload changes nothing and a retried round starts again from
                # the state of the last accepted one.
                if scaffold is not None and new_control is not None:
                    scaffold.commit(new_control)
                if self.config.strategy.local_layers:
                    local = {key: trained[key] for key in trained if key not in shared}
                    LocalLayerStore(self.local_layers_path).save(local)

            envelope, receipt, cost = self._upload(
                client, round_number, delta, extras, records, commit_site_state, masking
            )
        finally:
            if masking is not None:
                masking.close()
        if ledger is not None:
            client.report_privacy(
                self.config.study,
                round_number,
                self.site_id,
                status="spent",
                epsilon_spent=epsilon,
                delta=ledger.delta,
            )
        return self._uploaded_report(
            round_number,
            envelope,
            receipt,
            training_run,
            base,
            records,
            ledger,
            dense_values=sum(value.size for value in delta.values())
            + sum(v.size for group in extras.values() for v in group.values()),
            secagg_message_bytes_sent=cost.message_bytes_sent if cost else None,
            secagg_message_bytes_received=(
                cost.message_bytes_received if cost else None
            ),
            secagg_wall_seconds=cost.wall_seconds if cost else None,
            secagg_compute_seconds=cost.compute_seconds if cost else None,
        )

    def train_asynchronous(
        self, client: AggregationClient, update_number: int
    ) -> SiteRoundReport:
        """Train on the latest global version and upload the update to an
        asynchronous study.

        ``update_number`` counts this site's updates from 0 and takes the
        place of the round number in the privacy ledger, the learning-rate
        schedule and the training seed, so the ledger's budget still applies over
        ``training.rounds`` updates. An update that would exceed the budget is
        rejected before training (status ``rejected_budget``). An upload that
        arrives after the study published its last version gets status
        ``study_finished``, and one the service rejects as staler than
        ``max_staleness`` gets ``rejected_stale``.
        """
        self.prepare()
        inputs, labels = load_split(self.config, self.data_dir, "train")
        records = int(labels.shape[0])
        study = self.config.study
        ledger = self.ledger(records)
        if ledger is not None:
            self.check_asynchronous_ledger(client, ledger)
            try:
                ledger.check_next_round(update_number)
            except BudgetExceededError as error:
                ledger.save(self.ledger_path)
                logger.warning("%s", error)
                client.report_asynchronous_privacy(
                    study,
                    update_number,
                    self.site_id,
                    status="refused",
                    epsilon_spent=ledger.epsilon_spent(),
                    delta=ledger.delta,
                    message=str(error),
                )
                return self._asynchronous_report(
                    update_number, "rejected_budget", str(error), records, ledger
                )

        base = client.download_model(study, None)
        shared = self._shared_names(base.weights)
        # The seed and DP key fix the batches and the DP noise. A resumed study
        # takes the update number from the service's accepted updates, so an
        # update that reached the service without being accepted is trained
        # again under the same number. Its base version is part of the key:
        # the same noise on another base version's gradients would let anyone
        # who received both updates subtract the noise.
        training_run = self._train_update(
            base,
            shared,
            (inputs, labels),
            ledger,
            update_number,
            randomness=self._randomness(update_number, base_version=base.version),
        )
        epsilon = training_run.epsilon
        trained, delta = training_run.trained, training_run.delta
        if ledger is not None:
            # The ledger has spent the budget whatever becomes of the upload.
            # Reported before it, the spend is in the service's audit log
            # even if a crash ends the process once the service accepted the
            # update.
            client.report_asynchronous_privacy(
                study,
                update_number,
                self.site_id,
                status="spent",
                epsilon_spent=epsilon,
                delta=ledger.delta,
            )
        compression = self.config.compression
        encoder = build_update_encoder(compression, state_dir=self.study_dir)
        envelope = encode_envelope(
            delta,
            study=study,
            round_number=base.version,
            site=self.site_id,
            sample_count=records,
            nonce=secrets.token_hex(16),
            signer=self.signer,
            codec=encoder,
            compression=compression.envelope_compression,
            zstd_level=compression.envelope_zstd_level,
        )
        try:
            receipt = client.upload_asynchronous(
                study, base.version, self.site_id, envelope
            )
        except ServiceError as error:
            if error.status_code != 409:
                raise
            status = client.asynchronous_status(study)
            if status["finished"]:
                logger.info(
                    "site %s trained from version %d after study %s finished: %s",
                    self.site_id, base.version, study, error,
                )  # fmt: skip
                return self._asynchronous_report(
                    update_number, "study_finished", str(error), records, ledger
                )
            asynchronous = self.config.round.asynchronous
            assert asynchronous is not None
            staleness = int(status["latest_version"]) - base.version
            if (
                asynchronous.max_staleness is None
                or staleness <= asynchronous.max_staleness
            ):
                raise
            logger.warning("site %s: %s", self.site_id, error)
            return self._asynchronous_report(
                update_number, "rejected_stale", str(error), records, ledger,
                base_version=base.version,
            )  # fmt: skip
        if isinstance(encoder, ErrorFeedback):
            encoder.commit()
        if self.config.strategy.local_layers:
            local = {key: trained[key] for key in trained if key not in shared}
            LocalLayerStore(self.local_layers_path).save(local)
        return self._uploaded_report(
            update_number,
            envelope,
            receipt,
            training_run,
            base,
            records,
            ledger,
            dense_values=sum(value.size for value in delta.values()),
            base_version=base.version,
            staleness=int(receipt["staleness"]),
            published_version=receipt["published_version"],
        )

    def _train_update(
        self,
        base: DownloadedModel,
        shared: list[str],
        split: tuple[torch.Tensor, torch.Tensor],
        ledger: PrivacyLedger | None,
        number: int,
        *,
        randomness: tuple[int, bytes | None],
        correct_gradients: GradientCorrection | None = None,
    ) -> "_LocalUpdate":
        """Train from ``base`` and return the update of the ``shared`` weights.

        ``number`` is the round, or in an asynchronous study the site's
        update number; the ledger records the steps under it and is saved.
        ``randomness`` is the seed and DP key that ``_randomness`` returns.
        """
        model = self._model_with(self._merged_weights(base.weights))
        inputs, labels = split
        seed, dp_key = randomness
        result = train_locally(
            model,
            inputs,
            labels,
            self._training_settings(ledger, number),
            seed=seed,
            dp_key=dp_key,
            correct_gradients=correct_gradients,
        )
        trained = {
            key: value.detach().numpy() for key, value in model.state_dict().items()
        }
        epsilon = None
        if ledger is not None:
            epsilon = ledger.record_round(
                number, result.steps, update_sha256=weights_sha256(trained)
            )
            ledger.save(self.ledger_path)
        delta = {
            key: (trained[key] - base.weights[key]).astype(np.float32) for key in shared
        }
        return _LocalUpdate(result, epsilon, trained, delta)

    def _uploaded_report(
        self,
        number: int,
        envelope: bytes,
        receipt: dict[str, Any],
        training_run: "_LocalUpdate",
        base: DownloadedModel,
        records: int,
        ledger: PrivacyLedger | None,
        *,
        dense_values: int,
        **extra: Any,
    ) -> SiteRoundReport:
        """Build the report of an accepted upload; ``extra`` sets mode-specific fields.

        ``dense_values`` counts the values sent, for the float32 size that
        compression is measured against.
        """
        return SiteRoundReport(
            site=self.site_id,
            round=number,
            status="uploaded",
            message=(
                f"uploaded {len(envelope)} bytes after {training_run.result.steps} "
                "steps"
            ),
            train_records=records,
            epsilon_spent=training_run.epsilon,
            noise_multiplier=ledger.noise_multiplier if ledger else None,
            bytes_uploaded=len(envelope),
            bytes_downloaded=base.size,
            receipt=receipt["receipt"],
            dense_float32_bytes=4 * dense_values,
            **extra,
        )

    def _asynchronous_report(
        self,
        update_number: int,
        status: str,
        message: str,
        records: int,
        ledger: PrivacyLedger | None,
        *,
        base_version: int | None = None,
    ) -> SiteRoundReport:
        """Return the report of an asynchronous update the service did not accept."""
        return SiteRoundReport(
            site=self.site_id,
            round=update_number,
            status=status,
            message=message,
            train_records=records,
            epsilon_spent=ledger.epsilon_spent() if ledger else None,
            noise_multiplier=ledger.noise_multiplier if ledger else None,
            bytes_uploaded=0,
            bytes_downloaded=0,
            base_version=base_version,
        )

    def evaluate(
        self,
        client: AggregationClient,
        version: int | None = None,
        split: Literal["test", "val"] = "test",
    ) -> EvaluationAggregates:
        """Evaluate a global model on one site split; return aggregates only."""
        self.prepare()
        inputs, labels = load_split(self.config, self.data_dir, split)
        downloaded = client.download_model(self.config.study, version)
        weights = self._merged_weights(downloaded.weights)
        return evaluate_weights(self.config, weights, inputs, labels)

    # Strategy state kept at the site

    def _shared_names(self, weights: dict[str, np.ndarray]) -> list[str]:
        """Return the global model's tensors that the site uploads, in order."""
        patterns = self.config.strategy.local_layers
        return [key for key in weights if not is_local(key, patterns)]

    def _merged_weights(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the global weights with the site's own local layers, if any.

        Before the site's first accepted upload it has stored none, and the
        local layers keep the global model's values.
        """
        patterns = self.config.strategy.local_layers
        if not patterns:
            return weights
        stored = LocalLayerStore(self.local_layers_path).load()
        return merge_global(weights, stored, patterns)

    def _scaffold(
        self, client: AggregationClient, base: DownloadedModel, shared: list[str]
    ) -> ScaffoldSite | None:
        """Load the site's SCAFFOLD state when the study's strategy needs it."""
        if CONTROL_DELTA not in self._strategy().site_extras:
            return None
        published = client.download_published(self.config.study, base.version)
        return ScaffoldSite.load(
            self.control_variate_path,
            {key: base.weights[key] for key in shared},
            published.get(CONTROL_VARIATE),
            uncorrected=[key for key in base.weights if key not in shared],
        )

    # Uploads

    def _upload(
        self,
        client: AggregationClient,
        round_number: int,
        delta: dict[str, np.ndarray],
        extras: dict[str, dict[str, np.ndarray]],
        records: int,
        on_accepted: Callable[[], None],
        masking: BackgroundMaskingRound | None = None,
    ) -> tuple[bytes, dict[str, Any], MaskingRoundCost | None]:
        """Send the delta and its extras groups in one envelope.

        ``on_accepted`` runs as soon as the service has accepted the envelope,
        before the rest of a masking round.

        Returns:
            The envelope sent, the service's receipt and, under masking, the
            protocol's cost.

        Raises:
            ServiceError: the service rejected the upload.
        """
        mode = self.config.secure_aggregation.mode
        if mode == "masking":
            # train_round starts the key setup of every masking round.
            assert masking is not None
            tensors = pack_extras(delta, scale_extras_for_masking(extras, records))
            return self._upload_masked(client, masking, tensors, records, on_accepted)
        if mode == "ckks":
            # The config rejects CKKS with strategies that send extras.
            assert not extras
            envelope, receipt = self._upload_encrypted(
                client, round_number, delta, records
            )
            on_accepted()
            return envelope, receipt, None
        compression = self.config.compression
        encoder = build_update_encoder(compression, state_dir=self.study_dir)
        envelope = encode_envelope(
            pack_extras(delta, extras),
            study=self.config.study,
            round_number=round_number,
            site=self.site_id,
            sample_count=records,
            nonce=secrets.token_hex(16),
            signer=self.signer,
            codec=encoder,
            compression=compression.envelope_compression,
            zstd_level=compression.envelope_zstd_level,
        )
        receipt = client.upload(self.config.study, round_number, self.site_id, envelope)
        if isinstance(encoder, ErrorFeedback):
            # Only an accepted upload advances the residual, so a retried
            # round starts again from the residual of the last accepted one.
            encoder.commit()
        on_accepted()
        return envelope, receipt, None

    def decrypt_sum(
        self, client: AggregationClient, round_number: int
    ) -> dict[str, Any]:
        """Decrypt a CKKS round's encrypted sum and send it to the service.

        The sum is rounded with ``round_for_release`` before it leaves the
        site, so the service cannot solve for the secret key from it.

        Returns:
            A report: the contributors, their total sample count and the
            bytes moved. No value of the sum.

        Raises:
            SecureAggregationError: the sum does not decrypt to plausible
                values, which happens when the sites' secret contexts differ.
        """
        secure = self.config.secure_aggregation
        parameters = secure.ckks_parameters()
        context = self._ckks_context()
        encrypted = client.download_encrypted_sum(self.config.study, round_number)
        base = client.download_round_model(self.config.study, round_number)
        layout = VectorLayout.of(base.weights)
        decrypted = context.decrypt_vector(encrypted.ciphertexts, layout.length)
        bound = encrypted.sample_count * secure.clip + parameters.release_grid
        if not np.isfinite(decrypted).all() or np.abs(decrypted).max() > bound:
            raise SecureAggregationError(
                f"the encrypted sum of round {round_number} decrypts to values "
                f"beyond sample_count x clip = {encrypted.sample_count * secure.clip}; "
                f"site {self.site_id!r} may hold another CKKS secret context than "
                "the contributors"
            )
        released = layout.split(round_for_release(decrypted, parameters))
        envelope = encode_envelope(
            {name: value.astype(np.float32) for name, value in released.items()},
            study=self.config.study,
            round_number=round_number,
            site=self.site_id,
            sample_count=encrypted.sample_count,
            nonce=secrets.token_hex(16),
            signer=self.signer,
        )
        receipt = client.upload_decrypted_sum(
            self.config.study, round_number, self.site_id, envelope
        )
        logger.info(
            "site %s decrypted the sum of round %d from %d sites",
            self.site_id,
            round_number,
            len(encrypted.contributors),
        )
        return {
            "site": self.site_id,
            "round": round_number,
            "contributors": encrypted.contributors,
            "sample_count": encrypted.sample_count,
            "bytes_downloaded": encrypted.size + base.size,
            "bytes_uploaded": len(envelope),
            "sha256": receipt["sha256"],
        }

    def _ckks_context(self) -> CkksSiteContext:
        return load_secret_context(self.config, self.study_dir, self.kit_dir)

    def _upload_encrypted(
        self,
        client: AggregationClient,
        round_number: int,
        delta: dict[str, np.ndarray],
        records: int,
    ) -> tuple[bytes, dict[str, Any]]:
        """Encrypt the clipped, weighted update and upload it; return the envelope."""
        secure = self.config.secure_aggregation
        self._warn_clipped(delta)
        encryptor = CkksEncryptor(
            self._ckks_context(), sample_count=records, clip=secure.clip
        )
        envelope = encode_envelope(
            delta,
            study=self.config.study,
            round_number=round_number,
            site=self.site_id,
            sample_count=records,
            nonce=secrets.token_hex(16),
            signer=self.signer,
            codec=encryptor,
        )
        receipt = client.upload(self.config.study, round_number, self.site_id, envelope)
        return envelope, receipt

    def _warn_clipped(self, delta: dict[str, np.ndarray]) -> None:
        clip = self.config.secure_aggregation.clip
        clipped = sum(int((np.abs(value) > clip).sum()) for value in delta.values())
        if clipped:
            logger.warning(
                "site %s clips %d update values to +-%s for secure aggregation; "
                "raise secure_aggregation.clip to keep them",
                self.site_id, clipped, clip,
            )  # fmt: skip

    def _start_masking(
        self, client: AggregationClient, round_number: int
    ) -> BackgroundMaskingRound | None:
        """Start the round's masking key setup in the background, under masking."""
        if self.config.secure_aggregation.mode != "masking":
            return None
        site = self.masking_site(round_number)
        return BackgroundMaskingRound(
            MaskingClient(client.base_url, http_client=client.http_client),
            site,
            wait_seconds=self.config.round.deadline_seconds,
        )

    def masking_site(self, round_number: int) -> MaskingSite:
        """Build the site's protocol state for a masking round.

        With a kit, the site signs its key advertisement and rejects a roster
        with an advertisement that does not verify against the kit's site
        registry. Without one (local mode), advertisements are unsigned and
        unchecked, so nothing stops a service that swaps public keys.

        Raises:
            ConfigError: as ``load_advertisement_keys``.
        """
        keys = None
        if self.kit_dir is not None:
            keys = load_advertisement_keys(
                self.kit_dir, study=self.config.study, site=self.site_id
            )
        return MaskingSite(
            site=self.site_id,
            study=self.config.study,
            round_number=round_number,
            encoding=self.config.secure_aggregation.encoding(
                len(self.config.sites), self.config.compression.build_codec()
            ),
            signing_key=keys.signing_key if keys else None,
            peer_verify_keys=keys.verify_keys if keys else None,
            minimum_threshold=self.config.secure_aggregation.threshold,
        )

    def _upload_masked(
        self,
        client: AggregationClient,
        masking: BackgroundMaskingRound,
        tensors: dict[str, np.ndarray],
        records: int,
        on_accepted: Callable[[], None],
    ) -> tuple[bytes, dict[str, Any], MaskingRoundCost]:
        """Finish the round's masking protocol with the site's update.

        Returns:
            The envelope sent, the service's receipt and the protocol's cost.
        """
        self._warn_clipped(tensors)
        # NOTE: error feedback does not apply under masking, because the int8
        # ring encoder rounds stochastically and keeps no residual.
        sent: dict[str, Any] = {}

        def upload(envelope: bytes) -> None:
            sent["envelope"] = envelope
            sent["receipt"] = client.upload(
                self.config.study, masking.round_number, self.site_id, envelope
            )
            on_accepted()

        cost = masking.finish(
            tensors, sample_count=records, upload=upload, signer=self.signer
        )
        return sent["envelope"], sent["receipt"], cost

    def _model_with(self, weights: dict[str, np.ndarray]) -> torch.nn.Module:
        model = build_model(self.config.model.name, **self.config.model.params)
        model.load_state_dict(
            {key: torch.from_numpy(value.copy()) for key, value in weights.items()}
        )
        return model

    def _training_settings(
        self, ledger: PrivacyLedger | None, round_number: int
    ) -> LocalTrainingSettings:
        training = self.config.training
        return LocalTrainingSettings(
            epochs=training.local_epochs,
            batch_size=training.batch_size,
            learning_rate=training.round_learning_rate(round_number),
            positive_weight=training.positive_weight,
            logit_offset=self.logit_offset(ledger),
            momentum=training.momentum,
            weight_decay=training.weight_decay,
            max_grad_norm=ledger.max_grad_norm if ledger else None,
            noise_multiplier=ledger.noise_multiplier if ledger else None,
            augmentation=RandomAffine() if self.config.data.augment else None,
            proximal_mu=self._site_settings().get("proximal_mu"),
        )

    def _site_settings(self) -> dict[str, float]:
        return self._strategy().site_settings()

    def _strategy(self) -> Strategy:
        # The site builds the study's strategy only to read what it requires of
        # sites (FedProx's mu, SCAFFOLD's control deltas); aggregation stays at
        # the service.
        return build_study_strategy(self.config.strategy_settings())

    def _randomness(
        self, round_number: int, *, base_version: int | None = None
    ) -> tuple[int, bytes | None]:
        """Return a round's training seed and, under DP, its DP key."""
        seed = self._seed(round_number, base_version=base_version)
        if not self.config.privacy.enabled:
            return seed, None
        return seed, self._dp_key(round_number, base_version=base_version)

    def _seed(self, round_number: int, *, base_version: int | None = None) -> int:
        """Return the seed of a round's augmentation and, without DP, batches.

        Under DP the seed is 62 bits of the round's DP key (``_dp_key``).
        Without DP it comes from the config alone, so runs repeat bit for bit.
        """
        if not self.config.privacy.enabled:
            return zlib.crc32(self._round_label(round_number, base_version).encode())
        digest = self._dp_key(round_number, base_version=base_version)
        # 62 bits leave room for the seed + 2 of the augmentation generator
        # within torch's 64-bit seeds.
        return int.from_bytes(digest[:8], "big") >> 2

    def _dp_key(self, round_number: int, *, base_version: int | None = None) -> bytes:
        """Return the 32-byte key of a round's DP batch sampling and noise.

        It is SHA-256 over the site's secret noise key and the round, so no
        one without the site's state folder can recompute its noise, and the
        site replays a round's noise when it trains the round again.
        """
        label = self._round_label(round_number, base_version)
        return hashlib.sha256(self._noise_key() + label.encode()).digest()

    def _round_label(self, round_number: int, base_version: int | None) -> str:
        label = f"{self.config.training.seed}:{self.config.study}:{self.site_id}:{round_number}"
        if base_version is not None:
            label += f":base{base_version}"
        return label

    def _noise_key(self) -> bytes:
        """Return the site's secret DP noise key, creating it on first use.

        Raises:
            LedgerError: the key file exists but is not a key.
        """
        path = self.study_dir / NOISE_KEY_FILE
        if path.exists():
            key = path.read_bytes()
            if len(key) != NOISE_KEY_BYTES:
                raise LedgerError(
                    f"site {self.site_id!r}: DP noise key {path} has "
                    f"{len(key)} bytes, expected {NOISE_KEY_BYTES}. Restore it "
                    "from a backup of the site's state folder, or delete it to "
                    "draw new noise from the next round on"
                )
            return key
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(NOISE_KEY_BYTES)
        temporary = path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        return key


def evaluate_weights(
    config: StudyConfig,
    weights: dict[str, np.ndarray],
    inputs: torch.Tensor,
    labels: torch.Tensor,
) -> EvaluationAggregates:
    """Evaluate ``weights`` on (inputs, labels) and summarize as aggregates."""
    model = build_model(config.model.name, **config.model.params)
    model.load_state_dict(
        {key: torch.from_numpy(value.copy()) for key, value in weights.items()}
    )
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
        losses = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="none"
        )
        scores = torch.sigmoid(logits)
    return EvaluationAggregates.from_scores(
        scores.numpy(),
        labels.numpy(),
        losses.numpy(),
        bins=config.evaluation.histogram_bins,
    )


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """Return a SHA-256 over the names, dtypes, shapes and values of ``weights``."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        value = np.ascontiguousarray(weights[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def weights_to_safetensors(
    weights: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> bytes:
    return save_safetensors(
        {k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()},
        metadata=metadata,
    )
