"""Time plain, masking and CKKS rounds through the real aggregation service.

The script starts the aggregation service as ``medfed run`` does in local
mode (``python -m medfed.aggregation`` on 127.0.0.1, plain HTTP). It drives
whole rounds over HTTP with 4, 10 and 20 sites for two models: the
heart-disease logistic regression (``configs/heart_disease.yaml``, 16
parameters) and the pneumonia GroupNorm ResNet (``configs/pneumonia_nodp.yaml``,
``resnet_gn`` widths 16/32/64, 77,169 parameters). Each site runs in its own
thread of this process and uses the product's site code. Every request goes
through ``AggregationClient``. Masking uses ``MaskingSite`` and
``MaskingClient``, and CKKS the ``ckks`` codec with the secret context from
``load_secret_context``. The decrypting site calls ``SiteRunner.decrypt_sum``
(the flow's ``site_decrypt`` task). The coordinator's part (open, finalize, have the first
contributor decrypt, finalize again) follows the ``federated_training`` flow.

Each site uploads a fixed random delta of the model's exact tensor shapes,
the same every round, so no local training is timed. Round time here is
protocol, transfer and aggregation overhead, the part that the
secure-aggregation modes change. It runs from the coordinator opening the
round to the finalize call that publishes the new model version. For CKKS
that version is built from the decrypted aggregate, so the time includes the
decryption. Every site downloads the round's base model first, as in a real
round.

Sites share the machine's cores and this process's GIL, so their compute is
serialized here, where real hospitals would compute in parallel. Loopback
HTTP, on the other hand, has none of the latency of a hospital's network
link, which each extra request of the masking protocol would pay.

Bytes are counted per site with an httpx request hook: the body of every
request a site sends (its update envelope plus, under masking, the protocol
messages as JSON, plus for the decrypting CKKS site the decrypted sum), and
separately the request lines and headers including every poll.

Under masking, ``MaskingClient`` asks the service to hold each GET until the
round reaches its phase (``wait_per_poll``). A fourth variant runs masking
with ``wait_per_poll=0``, so sites poll every 0.2 s (``poll_interval``) as
they did before the service held requests. Each (model, sites, variant) cell
is one study. It runs one warm-up round, then ``--repeats`` timed rounds. The
variants take turns round by round, in an order that rotates each repeat, so
that load on the shared machine affects them alike. Results go to
``benchmarks/results/secagg_rounds.json``; the figures are discussed on
``docs/benchmarks-secagg.md``.

With ``--train`` each site instead trains before it uploads, with the
product's ``train_locally`` (one epoch, batch 64, learning rate 0.1, no DP,
one torch thread per site thread), on a real data share: for ``resnet_gn``
its IID share of the PneumoniaMNIST training split scaled to [0, 1], at most
``MAX_IMAGES_PER_SITE`` images; for the logistic regression its IID share of
the four hospitals' preprocessed heart-disease training records. It uploads
the trained weights minus the round's base model with its record count as
the sample count. Every variant trains on the same shares with the same
seeds, so variants differ only in the protocol. This run covers plain,
masking (held GETs) and CKKS, and it writes its figures under the
``with_training`` key of the same JSON file, next to the protocol-only ones.
Its round time contains every site's training, which here shares two cores,
where real sites would train in parallel on their own machines. It also
stores each site's training time and, from the protocol-only figures
already in the file, a derived deployment estimate: median site training
time plus the protocol-only round time.

With ``--site-wait`` each site sleeps, where it would train, for the median
training CPU time of its model and number of sites in the ``--train``
figures, so sites "train" at once as they would on their own machines.
Under masking a site starts its key setup with the round, as ``SiteRunner``
does, so the setup overlaps the sleep. For comparison, the
``masking_setup_after`` variant starts it after the sleep. The figures go under the
``with_site_wait`` key.

Run from the repository root::

    PYTHONPATH=. python benchmarks/secagg_rounds.py [--repeats 9]
    PYTHONPATH=. python benchmarks/secagg_rounds.py --train [--repeats 3]
    PYTHONPATH=. python benchmarks/secagg_rounds.py --site-wait [--repeats 9]
"""

import argparse
import inspect
import json
import os
import platform
import secrets
import statistics
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import yaml

from medfed.contract.codecs.ckks import CkksEncryptor
from medfed.contract.config import StudyConfig, parse_study_config
from medfed.contract.models import build_model
from medfed.contract.secagg import MaskingSite, VectorLayout
from medfed.contract.wire import encode_envelope
from medfed.flows.local import LocalAggregationService
from medfed.sites.ckks_keys import ensure_local_secret_contexts, load_secret_context
from medfed.sites.client import AggregationClient, connection_limits
from medfed.sites.compression import build_update_encoder
from medfed.sites.data.heart import (
    HEART_FILES,
    load_site_dataset,
    preprocess_heart_site,
)
from medfed.sites.data.imaging import scale_to_unit
from medfed.sites.data.partition import get_partitioner
from medfed.sites.data.pneumonia import load_pneumoniamnist
from medfed.sites.data.root import resolve_data_root, verified_file
from medfed.sites.runner import (
    SiteRunner,
    initial_model_weights,
    weights_to_safetensors,
)
from medfed.sites.secagg_client import (
    BackgroundMaskingRound,
    MaskingClient,
    MaskingRoundCost,
)
from medfed.sites.training import LocalTrainingSettings, train_locally

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "secagg_rounds.json"
SITE_COUNTS = (4, 10, 20)
#: Variant name: the study's ``secure_aggregation.mode`` and the masking
#: client's ``wait_per_poll`` in seconds (None: ``MaskingClient``'s default,
#: as ``SiteRunner`` uses it). Under ``masking_polls`` the service responds
#: to every poll at once, so sites poll every ``poll_interval``.
VARIANTS: dict[str, tuple[str, float | None]] = {
    "none": ("none", None),
    "masking": ("masking", None),
    "masking_polls": ("masking", 0.0),
    "ckks": ("ckks", None),
    "masking_setup_after": ("masking", None),
}
#: Variants of the protocol-only run.
PROTOCOL_VARIANTS = ("none", "masking", "masking_polls", "ckks")
#: Under this variant a masking site exchanges keys only after its training
#: (or wait), as ``SiteRunner`` did before it overlapped the two.
SETUP_AFTER_VARIANTS = {"masking_setup_after"}
_CLIENT_DEFAULTS = inspect.signature(MaskingClient).parameters
DEFAULT_POLL_SECONDS = _CLIENT_DEFAULTS["poll_interval"].default
DEFAULT_WAIT_PER_POLL = _CLIENT_DEFAULTS["wait_per_poll"].default
#: Model name in the results, and the study config whose model it is.
MODELS = {
    "logistic_regression": REPO / "configs" / "heart_disease.yaml",
    "resnet_gn": REPO / "configs" / "pneumonia_nodp.yaml",
}
SAMPLE_COUNT = 200
#: The service's limit on open connections and requests. Above it uvicorn
#: responds 503, and a masking site whose key advertisement gets 503 makes
#: the other sites wait until the round's deadline.
MAX_CONCURRENCY = 2048
#: Standard deviation of the random update values. It is far inside the
#: default clip of 1.0, so no value is clipped.
DELTA_SCALE = 0.01
#: Largest error of a published weight against base + the sample-weighted
#: mean delta. Masking rounds each weighted value to the nearest 2^-10, and a
#: CKKS sum leaves the decrypting site rounded to about 1e-3
#: (``round_for_release``). Divided by the total sample count (at least 100
#: in every study here), both stay below 1e-5.
MAX_ABS_ERROR = 1e-4
#: Variants of the ``--train`` run, and the JSON key of its figures.
TRAIN_VARIANTS = ("none", "masking", "ckks")
TRAIN_KEY = "with_training"
#: Variants of the ``--site-wait`` run, and the JSON key of its figures.
WAIT_VARIANTS = ("none", "masking", "masking_setup_after", "ckks")
WAIT_KEY = "with_site_wait"
#: Local training of every site in every ``--train`` round.
TRAINING_SETTINGS = LocalTrainingSettings(epochs=1, batch_size=64, learning_rate=0.1)
#: Cap on a ``resnet_gn`` site's training images, which keeps each round's
#: training to seconds on two shared cores. The IID shares of the 4,708
#: training images are 1,177 (4 sites), 470 (10) and 235 or 236 (20), so the
#: cap applies at 4 and 10 sites.
MAX_IMAGES_PER_SITE = 400
#: Targets against plain: masking bytes and round time at 10 sites, CKKS
#: bytes at every number of sites.
TARGET_SITES = 10
MASKING_BYTES_TARGET = 1.1
MASKING_TIME_TARGET = 1.2
CKKS_BYTES_TARGET = 16.0


def study_config(model: str, site_count: int, variant: str) -> StudyConfig:
    """Return the model's study config for ``site_count`` sites and ``variant``.

    Only the sites, the study id and ``secure_aggregation.mode`` change, so
    the encoding and CKKS parameters are the schema's defaults that the
    studies use. DP is off, because sites either upload a fixed delta or
    train without DP (``TRAINING_SETTINGS``).
    """
    raw = yaml.safe_load(MODELS[model].read_text(encoding="utf-8"))
    # Ids of equal length, because the envelope header carries the study id
    # and the byte ratios between variants should not depend on it.
    model_number = list(MODELS).index(model)
    variant_number = list(VARIANTS).index(variant)
    raw["study"] = f"bench-{model_number}-{site_count:02d}-{variant_number}"
    # The benchmark gives each site its data itself, so sites need only ids.
    raw["sites"] = [{"id": f"site-{index:02d}"} for index in range(site_count)]
    raw["privacy"] = {"enabled": False}
    raw["secure_aggregation"] = {"mode": VARIANTS[variant][0]}
    return parse_study_config(raw, source=str(MODELS[model]))


def initial_model(config: StudyConfig) -> bytes:
    """Return the study's initial model with its settings, as the flow builds it."""
    # NOTE: a copy of ``_Coordinator._initial_model`` in medfed/flows/training.py,
    # which is private to the flow; keep the two in step.
    strategy = config.strategy
    settings = {
        "sites": [site.id for site in config.sites],
        "strategy": strategy.name,
        "strategy_params": strategy.params,
        "wrappers": [[wrapper.name, wrapper.params] for wrapper in strategy.wrappers],
        "secure_aggregation": config.secure_aggregation.model_dump(mode="json"),
        "compression": {
            "codec": config.compression.codec,
            "params": config.compression.params,
        },
        "local_layers": list(strategy.local_layers),
    }
    return weights_to_safetensors(
        initial_model_weights(config),
        metadata={"medfed_study_settings": json.dumps(settings)},
    )


# Traffic


@dataclass
class Traffic:
    """Bytes one client sent and received over HTTP."""

    body_bytes_sent: int = 0
    #: Request lines and headers as httpx sends them over HTTP/1.1.
    head_bytes_sent: int = 0
    body_bytes_received: int = 0
    requests: int = 0

    def minus(self, earlier: "Traffic") -> "Traffic":
        return Traffic(
            **{
                name: value - getattr(earlier, name)
                for name, value in asdict(self).items()
            }
        )


class MeteredClient:
    """An ``AggregationClient`` whose HTTP client counts every request's bytes."""

    def __init__(self, base_url: str) -> None:
        self.traffic = Traffic()
        self._lock = threading.Lock()
        http = httpx.Client(
            base_url=base_url,
            timeout=120.0,
            limits=connection_limits(),
            trust_env=False,
            event_hooks={
                "request": [self._on_request],
                "response": [self._on_response],
            },
        )
        self.client = AggregationClient(base_url, http_client=http)

    def snapshot(self) -> Traffic:
        with self._lock:
            return Traffic(**asdict(self.traffic))

    def _on_request(self, request: httpx.Request) -> None:
        head = len(f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n")
        head += sum(len(name) + len(value) + 4 for name, value in request.headers.raw)
        with self._lock:
            self.traffic.requests += 1
            self.traffic.head_bytes_sent += head + 2
            self.traffic.body_bytes_sent += len(request.content)

    def _on_response(self, response: httpx.Response) -> None:
        response.read()
        with self._lock:
            self.traffic.body_bytes_received += len(response.content)


# Sites


@dataclass
class SiteResult:
    site: str
    envelope_bytes: int
    traffic: Traffic
    seconds: float
    #: Masking only: the site's ``MaskingRoundCost``, from advertising keys to
    #: revealing shares (wall) and in its own protocol steps (compute).
    masking_wall_seconds: float | None = None
    masking_compute_seconds: float | None = None
    #: ``--train`` only: the site's ``train_locally`` call in wall time and in
    #: the CPU time of its thread. The wall time includes waiting for the
    #: cores that the other sites share; the CPU time approximates training
    #: alone on one core.
    train_seconds: float | None = None
    train_cpu_seconds: float | None = None


@dataclass(frozen=True)
class TrainingShare:
    """A site's training records for ``--train`` rounds."""

    inputs: torch.Tensor
    labels: torch.Tensor


@dataclass
class BenchSite:
    """One site of a study: its client, state folder and update.

    Without ``training`` the site uploads the fixed ``delta`` every round.
    With it, each round replaces ``delta`` by the trained weights minus the
    round's base model and ``sample_count`` is the share's record count.
    """

    name: str
    config: StudyConfig
    state_dir: Path
    metered: MeteredClient
    delta: dict[str, np.ndarray]
    wait_per_poll: float | None
    sample_count: int = SAMPLE_COUNT
    training: TrainingShare | None = None
    #: ``--site-wait`` only: seconds the site sleeps in place of training.
    wait_seconds: float | None = None
    #: Exchange masking keys only after training, not during it.
    setup_after: bool = False

    def run_round(self, round_number: int) -> SiteResult:
        """Download the base model, train if set, upload in the study's mode."""
        started = time.perf_counter()
        before = self.metered.snapshot()
        client = self.metered.client
        study = self.config.study
        mode = self.config.secure_aggregation.mode
        # As in SiteRunner.train_round, the key setup starts with the round.
        masking = (
            self._start_masking(round_number)
            if mode == "masking" and not self.setup_after
            else None
        )
        base = client.download_round_model(study, round_number)
        train_seconds = train_cpu_seconds = None
        if self.training is not None:
            train_seconds, train_cpu_seconds = self._train(
                self.training, base.weights, round_number
            )
        elif self.wait_seconds is not None:
            # Replaces training on the site's own machine, which would use no
            # CPU of the other sites or of the service.
            time.sleep(self.wait_seconds)

        cost = None
        if mode == "masking":
            if masking is None:
                masking = self._start_masking(round_number)
            envelope, cost = self._finish_masked(masking, round_number)
        elif mode == "ckks":
            envelope = self._envelope(round_number, codec=self._encryptor())
            client.upload(study, round_number, self.name, envelope)
        else:
            encoder = build_update_encoder(
                self.config.compression, state_dir=self.study_dir
            )
            envelope = self._envelope(
                round_number,
                codec=encoder,
                compression=self.config.compression.envelope_compression,
            )
            client.upload(study, round_number, self.name, envelope)

        return SiteResult(
            site=self.name,
            envelope_bytes=len(envelope),
            traffic=self.metered.snapshot().minus(before),
            seconds=time.perf_counter() - started,
            masking_wall_seconds=cost.wall_seconds if cost else None,
            masking_compute_seconds=cost.compute_seconds if cost else None,
            train_seconds=train_seconds,
            train_cpu_seconds=train_cpu_seconds,
        )

    def _train(
        self, share: TrainingShare, base: dict[str, np.ndarray], round_number: int
    ) -> tuple[float, float]:
        """Train on the base model, set ``delta`` and return wall and CPU seconds."""
        model = build_model(self.config.model.name, **self.config.model.params)
        model.load_state_dict(
            {key: torch.from_numpy(value.copy()) for key, value in base.items()}
        )
        # The seed depends on the site and round only, so every variant's
        # site draws the same batches.
        seed = zlib.crc32(f"{self.name}:{round_number}".encode())
        wall_started = time.perf_counter()
        cpu_started = time.thread_time()
        train_locally(model, share.inputs, share.labels, TRAINING_SETTINGS, seed=seed)
        cpu_seconds = time.thread_time() - cpu_started
        wall_seconds = time.perf_counter() - wall_started
        trained = model.state_dict()
        self.delta = {
            key: (trained[key].detach().numpy() - value).astype(np.float32)
            for key, value in base.items()
        }
        return wall_seconds, cpu_seconds

    def decrypt(self, round_number: int) -> SiteResult:
        """Decrypt the round's sum with the product's ``site_decrypt`` code."""
        started = time.perf_counter()
        before = self.metered.snapshot()
        runner = SiteRunner(self.config, self.name, self.state_dir)
        report = runner.decrypt_sum(self.metered.client, round_number)
        return SiteResult(
            site=self.name,
            envelope_bytes=int(report["bytes_uploaded"]),
            traffic=self.metered.snapshot().minus(before),
            seconds=time.perf_counter() - started,
        )

    @property
    def study_dir(self) -> Path:
        return SiteRunner(self.config, self.name, self.state_dir).study_dir

    def _envelope(self, round_number: int, **codec: Any) -> bytes:
        return encode_envelope(
            self.delta,
            study=self.config.study,
            round_number=round_number,
            site=self.name,
            sample_count=self.sample_count,
            nonce=secrets.token_hex(16),
            **codec,
        )

    def _encryptor(self) -> CkksEncryptor:
        # Read from disk for every upload, as ``SiteRunner`` does.
        context = load_secret_context(self.config, self.study_dir, None)
        return CkksEncryptor(
            context,
            sample_count=self.sample_count,
            clip=self.config.secure_aggregation.clip,
        )

    def _start_masking(self, round_number: int) -> BackgroundMaskingRound:
        """Start the round's masking key setup as ``SiteRunner`` does."""
        secure = self.config.secure_aggregation
        site = MaskingSite(
            site=self.name,
            study=self.config.study,
            round_number=round_number,
            encoding=secure.encoding(
                len(self.config.sites), self.config.compression.build_codec()
            ),
        )
        client = self.metered.client
        masking_client = MaskingClient(
            client.base_url,
            http_client=client.http_client,
            wait_per_poll=(
                DEFAULT_WAIT_PER_POLL
                if self.wait_per_poll is None
                else self.wait_per_poll
            ),
        )
        return BackgroundMaskingRound(
            masking_client, site, wait_seconds=self.config.round.deadline_seconds
        )

    def _finish_masked(
        self, masking: BackgroundMaskingRound, round_number: int
    ) -> tuple[bytes, MaskingRoundCost]:
        """Mask, upload and reveal as ``SiteRunner`` does, with its defaults."""
        client = self.metered.client
        sent: dict[str, bytes] = {}

        def upload(envelope: bytes) -> None:
            sent["envelope"] = envelope
            client.upload(self.config.study, round_number, self.name, envelope)

        try:
            cost = masking.finish(
                self.delta, sample_count=self.sample_count, upload=upload
            )
        finally:
            masking.close()
        return sent["envelope"], cost


# Studies and rounds


@dataclass
class Cell:
    """One (model, sites, variant) study on the service and its rounds."""

    model: str
    variant: str
    config: StudyConfig
    sites: list[BenchSite]
    coordinator: MeteredClient
    pool: ThreadPoolExecutor
    weights: dict[str, np.ndarray]
    next_round: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return self.config.secure_aggregation.mode

    def run_round(self) -> dict[str, Any]:
        """Run one round from opening to the new model version; return its figures."""
        round_number = self.next_round
        study = self.config.study
        names = [site.name for site in self.sites]
        load = os.getloadavg()[0]

        started = time.perf_counter()
        self.coordinator.client.open_round(
            study,
            round_number,
            sites=names,
            quorum=self.config.quorum,
            deadline_seconds=self.config.round.deadline_seconds,
        )
        futures = [
            self.pool.submit(site.run_round, round_number) for site in self.sites
        ]
        results = [future.result() for future in futures]
        uploaded = time.perf_counter()

        status = self.coordinator.client.finalize(study, round_number)
        decrypted = None
        if status["state"] == "open" and "ckks" in status:
            # The flow tries the contributors in sorted order, and here the
            # first one succeeds.
            first = sorted(status["ckks"]["contributors"])[0]
            decrypting = next(site for site in self.sites if site.name == first)
            decrypted = decrypting.decrypt(round_number)
            status = self.coordinator.client.finalize(study, round_number)
        finished = time.perf_counter()

        if status["state"] != "finalized":
            raise RuntimeError(
                f"round {round_number} of study {study} ended {status['state']}: "
                f"{status.get('reason')}"
            )
        self.next_round += 1
        error = self._check_model(int(status["result_version"]))
        if error > MAX_ABS_ERROR:
            raise RuntimeError(
                f"round {round_number} of study {study} published a model that "
                f"differs from base + mean delta by {error:.3g}, more than "
                f"{MAX_ABS_ERROR}"
            )
        record: dict[str, Any] = {
            "round": round_number,
            "round_seconds": finished - started,
            "sites_seconds": uploaded - started,
            "finalize_seconds": finished - uploaded,
            "load_average_1min": load,
            "max_abs_error": error,
        }
        if self.sites[0].training is not None:
            record["train_seconds_site_median"] = statistics.median(
                result.train_seconds or 0.0 for result in results
            )
            record["train_cpu_seconds_site_median"] = statistics.median(
                result.train_cpu_seconds or 0.0 for result in results
            )
        record["site_results"] = [asdict(result) for result in results]
        record["decrypt"] = asdict(decrypted) if decrypted else None
        return record

    def _check_model(self, version: int) -> float:
        """Return the largest error of the new model against base + mean delta.

        The mean is weighted by each site's sample count, as FedAvg weighs it.
        """
        model = self.coordinator.client.download_model(self.config.study, version)
        counts = [site.sample_count for site in self.sites]
        mean = {
            name: np.average(
                [site.delta[name] for site in self.sites], axis=0, weights=counts
            )
            for name in self.weights
        }
        error = max(
            float(
                np.max(np.abs(model.weights[name] - (self.weights[name] + mean[name])))
            )
            for name in self.weights
        )
        self.weights = model.weights
        return error


def fixed_delta(weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(0.0, DELTA_SCALE, value.shape).astype(np.float32)
        for name, value in weights.items()
    }


def create_cell(
    model: str,
    site_count: int,
    variant: str,
    service_url: str,
    work_dir: Path,
    shares: list[TrainingShare] | None = None,
    wait_seconds: float | None = None,
) -> Cell:
    """Create the cell's study on the service.

    Sites train on ``shares`` if given, or else sleep ``wait_seconds`` if
    given, before they upload.
    """
    config = study_config(model, site_count, variant)
    mode, wait_per_poll = VARIANTS[variant]
    weights = initial_model_weights(config)
    sites = [
        BenchSite(
            name=site.id,
            config=config,
            state_dir=work_dir / "sites" / site.id,
            metered=MeteredClient(service_url),
            delta=fixed_delta(weights, seed=index),
            wait_per_poll=wait_per_poll,
            sample_count=len(shares[index].labels) if shares else SAMPLE_COUNT,
            training=shares[index] if shares else None,
            wait_seconds=wait_seconds,
            setup_after=variant in SETUP_AFTER_VARIANTS,
        )
        for index, site in enumerate(config.sites)
    ]
    if mode == "ckks":
        ensure_local_secret_contexts(config, [site.study_dir for site in sites])
    coordinator = MeteredClient(service_url)
    coordinator.client.create_study(config.study, initial_model(config))
    return Cell(
        model=model,
        variant=variant,
        config=config,
        sites=sites,
        coordinator=coordinator,
        # One torch thread per site thread, so that sites do not also compete
        # through torch's own thread pool.
        pool=ThreadPoolExecutor(
            max_workers=site_count,
            initializer=torch.set_num_threads,
            initargs=(1,),
        ),
        weights=weights,
    )


# Training data


def training_shares(
    model: str, site_count: int, data_root: Path, work_dir: Path
) -> list[TrainingShare]:
    """Return each site's training share for ``--train`` rounds of ``model``."""
    config = study_config(model, site_count, "none")
    if config.data.dataset == "pneumoniamnist":
        return pneumonia_shares(config, data_root)
    return heart_shares(config, data_root, work_dir)


def pneumonia_shares(config: StudyConfig, data_root: Path) -> list[TrainingShare]:
    """Split the PneumoniaMNIST training split IID, capped at ``MAX_IMAGES_PER_SITE``.

    A capped site keeps the first images of its share in file order. Images
    are scaled to [0, 1] as the ``scale`` normalization of the product does.
    """
    images, labels = load_pneumoniamnist(data_root, download=False)["train"]
    parts = get_partitioner("iid").split(
        labels, sites=len(config.sites), seed=config.data.seed
    )
    shares = []
    for part in parts:
        kept = part[:MAX_IMAGES_PER_SITE]
        shares.append(
            TrainingShare(
                inputs=torch.from_numpy(scale_to_unit(images[kept])).unsqueeze(1),
                labels=torch.from_numpy(labels[kept].astype(np.float32)),
            )
        )
    return shares


def heart_shares(
    config: StudyConfig, data_root: Path, work_dir: Path
) -> list[TrainingShare]:
    """Split the four hospitals' heart-disease training records IID across the sites.

    Each hospital file is preprocessed as the product does, standardized with
    its own training statistics. The pooled training records are then cut
    into one share per site.
    """
    features, labels = [], []
    for source, spec in HEART_FILES.items():
        # Fails with the file's name when it is missing, instead of
        # downloading it as ``preprocess_heart_site`` would.
        verified_file(data_root, spec, download=False)
        out_dir = work_dir / "heart-data" / source
        preprocess_heart_site(
            data_root,
            source,
            out_dir,
            test_fraction=config.data.test_fraction,
            seed=config.data.seed,
        )
        dataset = load_site_dataset(out_dir, "train")
        features.append(dataset.features)
        labels.append(dataset.labels)
    pooled_features = np.concatenate(features)
    pooled_labels = np.concatenate(labels)
    parts = get_partitioner("iid").split(
        pooled_labels.astype(np.int64), sites=len(config.sites), seed=config.data.seed
    )
    return [
        TrainingShare(
            inputs=torch.from_numpy(pooled_features[part]),
            labels=torch.from_numpy(pooled_labels[part]),
        )
        for part in parts
    ]


# Summary


def site_figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Return per-site bytes: the median over sites and rounds, and the largest."""
    sent, heads, envelopes, received, requests = [], [], [], [], []
    worst = 0
    for record in rounds:
        for site in record["site_results"]:
            traffic = site["traffic"]
            sent.append(traffic["body_bytes_sent"])
            heads.append(traffic["head_bytes_sent"])
            envelopes.append(site["envelope_bytes"])
            received.append(traffic["body_bytes_received"])
            requests.append(traffic["requests"])
            extra = (
                record["decrypt"]["traffic"]["body_bytes_sent"]
                if (record["decrypt"] and record["decrypt"]["site"] == site["site"])
                else 0
            )
            worst = max(worst, traffic["body_bytes_sent"] + extra)
    return {
        "envelope_bytes_per_site": int(statistics.median(envelopes)),
        "bytes_sent_per_site": int(statistics.median(sent)),
        "bytes_sent_max_site": worst,
        "http_head_bytes_sent_per_site": int(statistics.median(heads)),
        "requests_per_site": statistics.median(requests),
        "bytes_received_per_site": int(statistics.median(received)),
    }


def summarize(cells: list[Cell], parameters: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        times = [record["round_seconds"] for record in cell.rounds]
        row: dict[str, Any] = {
            "model": cell.model,
            "parameters": parameters[cell.model],
            "sites": len(cell.sites),
            "variant": cell.variant,
            "mode": cell.mode,
            "study": cell.config.study,
            "rounds_timed": len(times),
            "round_seconds_median": statistics.median(times),
            "round_seconds_min": min(times),
            "round_seconds_max": max(times),
            "sites_seconds_median": statistics.median(
                record["sites_seconds"] for record in cell.rounds
            ),
            "finalize_seconds_median": statistics.median(
                record["finalize_seconds"] for record in cell.rounds
            ),
            "decrypt_seconds_median": (
                statistics.median(
                    record["decrypt"]["seconds"] for record in cell.rounds
                )
                if cell.mode == "ckks"
                else None
            ),
            "load_average_1min_median": statistics.median(
                record["load_average_1min"] for record in cell.rounds
            ),
            "max_abs_error": max(record["max_abs_error"] for record in cell.rounds),
            **site_figures(cell.rounds),
        }
        if cell.sites[0].training is not None:
            row["train_records_per_site_median"] = statistics.median(
                site.sample_count for site in cell.sites
            )
            row["train_seconds_median"] = statistics.median(
                record["train_seconds_site_median"] for record in cell.rounds
            )
            row["train_cpu_seconds_median"] = statistics.median(
                record["train_cpu_seconds_site_median"] for record in cell.rounds
            )
        rows.append(row)
    plain = {
        (row["model"], row["sites"]): row for row in rows if row["variant"] == "none"
    }
    for row in rows:
        base = plain[(row["model"], row["sites"])]
        for key in (
            "envelope_bytes_per_site",
            "bytes_sent_per_site",
            "bytes_sent_max_site",
        ):
            row[f"{key}_vs_plain"] = row[key] / base["bytes_sent_per_site"]
        row["round_seconds_vs_plain"] = (
            row["round_seconds_median"] / base["round_seconds_median"]
        )
    return rows


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return each target per model, with the measured ratio and whether it is met."""
    checks = []
    for row in rows:
        if row["variant"] == "masking" and row["sites"] == TARGET_SITES:
            checks.append(
                _check(row, "bytes_sent_max_site_vs_plain", MASKING_BYTES_TARGET)
            )
            checks.append(_check(row, "round_seconds_vs_plain", MASKING_TIME_TARGET))
        if row["variant"] == "ckks":
            checks.append(
                _check(row, "bytes_sent_max_site_vs_plain", CKKS_BYTES_TARGET)
            )
    return checks


def deployment_estimates(
    cells: list[Cell], protocol_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Derive each variant's round time if every site trained on its own machine.

    Derived, not measured: the median site training time of the ``--train``
    rounds plus the variant's median round time from ``protocol_rows``, the
    protocol-only run. The training time is the CPU time of the site's
    thread, over every site and timed round of the group's variants, which
    train alike. The two come from different runs, so machine load may
    differ between them.
    """
    protocol = {
        (row["model"], row["sites"], row["variant"]): row["round_seconds_median"]
        for row in protocol_rows
    }
    groups = list(dict.fromkeys((cell.model, len(cell.sites)) for cell in cells))
    estimates = []
    for model, site_count in groups:
        training = statistics.median(
            site["train_cpu_seconds"]
            for cell in cells
            if (cell.model, len(cell.sites)) == (model, site_count)
            for record in cell.rounds
            for site in record["site_results"]
        )
        plain = protocol.get((model, site_count, "none"))
        if plain is None:
            continue
        for variant in TRAIN_VARIANTS:
            seconds = protocol.get((model, site_count, variant))
            if seconds is None:
                continue
            estimates.append(
                {
                    "model": model,
                    "sites": site_count,
                    "variant": variant,
                    "derived": True,
                    "site_train_cpu_seconds_median": training,
                    "protocol_round_seconds": seconds,
                    "round_seconds": training + seconds,
                    "round_seconds_vs_plain": (training + seconds) / (training + plain),
                }
            )
    return estimates


def _check(row: dict[str, Any], measure: str, target: float) -> dict[str, Any]:
    return {
        "model": row["model"],
        "sites": row["sites"],
        "variant": row["variant"],
        "measure": measure,
        "target_at_most": target,
        "measured": row[measure],
        "met": row[measure] <= target,
    }


# Main


@contextmanager
def running_cells(
    service_url: str,
    work_dir: Path,
    groups: list[tuple[str, int]],
    variants: list[str],
    shares: dict[tuple[str, int], list[TrainingShare]],
    waits: dict[tuple[str, int], float],
) -> Iterator[list[Cell]]:
    cells = [
        create_cell(
            model,
            site_count,
            variant,
            service_url,
            work_dir,
            shares.get((model, site_count)),
            waits.get((model, site_count)),
        )
        for model, site_count in groups
        for variant in variants
    ]
    try:
        yield cells
    finally:
        for cell in cells:
            cell.pool.shutdown()
            cell.coordinator.client.close()
            for site in cell.sites:
                site.metered.client.close()


def run(cells: list[Cell], repeats: int, groups: list[tuple[str, int]]) -> None:
    """Run a warm-up round per cell, then ``repeats`` timed rounds, variants in turn."""
    by_group = {
        group: [cell for cell in cells if (cell.model, len(cell.sites)) == group]
        for group in groups
    }
    for repeat in range(repeats + 1):
        for group, members in by_group.items():
            shift = repeat % len(members)
            for cell in members[shift:] + members[:shift]:
                record = cell.run_round()
                if repeat > 0:
                    cell.rounds.append(record)
                training = (
                    f" training {record['train_cpu_seconds_site_median']:.3f} s CPU"
                    if "train_cpu_seconds_site_median" in record
                    else ""
                )
                print(
                    f"{'warm-up' if repeat == 0 else f'repeat {repeat}':9s} "
                    f"{group[0]:20s} {group[1]:3d} {cell.variant:18s} "
                    f"{record['round_seconds']:7.3f} s{training} "
                    f"load {record['load_average_1min']:.2f}",
                    flush=True,
                )


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per cell (median); default 9, or 3 with --train",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=list(MODELS),
        help="models to measure",
    )
    parser.add_argument(
        "--sites",
        nargs="+",
        type=int,
        default=list(SITE_COUNTS),
        help="numbers of sites to measure",
    )
    parser.add_argument(
        "--train",
        action="store_true",
        help=(
            "train every site on a real data share before it uploads, and "
            f"store the figures under the {TRAIN_KEY!r} key of the output"
        ),
    )
    parser.add_argument(
        "--site-wait",
        action="store_true",
        help=(
            "have every site sleep, before it uploads, for the median training "
            f"CPU time of the --train run, and store the figures under the "
            f"{WAIT_KEY!r} key of the output"
        ),
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=(
            "folder holding pneumoniamnist/ and heart-disease/ for --train; "
            "default: MEDFED_DATA_DIR, then ../shared/data"
        ),
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="path of the JSON results"
    )
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    if arguments.train and arguments.site_wait:
        raise SystemExit("choose one of --train and --site-wait")
    repeats = arguments.repeats or (3 if arguments.train else 9)
    if arguments.train:
        variants = list(TRAIN_VARIANTS)
    elif arguments.site_wait:
        variants = list(WAIT_VARIANTS)
    else:
        variants = list(PROTOCOL_VARIANTS)
    previous: dict[str, Any] = (
        json.loads(arguments.output.read_text(encoding="utf-8"))
        if arguments.output.exists()
        else {}
    )

    started = time.monotonic()
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    parameters = {
        model: VectorLayout.of(
            initial_model_weights(study_config(model, 4, "none"))
        ).length
        for model in arguments.models
    }
    groups = [(model, count) for model in arguments.models for count in arguments.sites]
    waits = site_waits(previous, groups) if arguments.site_wait else {}
    with tempfile.TemporaryDirectory(prefix="secagg-rounds-") as folder:
        work_dir = Path(folder)
        shares = {}
        if arguments.train:
            data_root = resolve_data_root(
                str(arguments.data_root) if arguments.data_root else None
            )
            shares = {
                group: training_shares(*group, data_root, work_dir) for group in groups
            }
        with (
            # Every site of every cell keeps its own keep-alive connections,
            # more than the default limit of 256 once the cells add up.
            LocalAggregationService(
                work_dir / "aggregation",
                max_upload_bytes=64 * 1024 * 1024,
                max_concurrency=MAX_CONCURRENCY,
            ) as service,
            running_cells(
                service.url, work_dir, groups, variants, shares, waits
            ) as cells,
        ):
            run(cells, repeats, groups)
    rows = summarize(cells, parameters)
    secure = cells[0].config.secure_aggregation
    section: dict[str, Any] = {
        "script": "benchmarks/secagg_rounds.py"
        + (" --train" if arguments.train else ""),
        "repeats": repeats,
        "wall_seconds": time.monotonic() - started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "service": (
            "python -m medfed.aggregation on 127.0.0.1, local mode (plain HTTP, "
            f"unsigned envelopes), --max-concurrency {MAX_CONCURRENCY}"
        ),
        "sites": "threads of the benchmark process, one httpx client each",
    }
    if arguments.train:
        section.update(training_description())
    elif arguments.site_wait:
        section["site_wait_seconds"] = [
            {"model": model, "sites": count, "seconds": seconds}
            for (model, count), seconds in waits.items()
        ]
        section["site_wait_basis"] = (
            "each site sleeps, before it uploads, for the median train_cpu_seconds "
            f"of its model and number of sites in the {TRAIN_KEY!r} results: "
            "sites that train at once on their own machines. Under masking "
            "the key setup runs during the sleep, as in SiteRunner, except "
            "in masking_setup_after, where it starts after it"
        )
    else:
        section["sample_count_per_site"] = SAMPLE_COUNT
        section["delta_scale"] = DELTA_SCALE
    section.update(
        {
            "masking_poll_seconds": DEFAULT_POLL_SECONDS,
            "masking_wait_per_poll_seconds": DEFAULT_WAIT_PER_POLL,
            "secure_aggregation": secure.model_dump(mode="json", exclude={"mode"}),
            "results": rows,
            "targets": check_targets(rows),
        }
    )
    if arguments.train:
        estimates = deployment_estimates(cells, previous.get("results", []))
        section["deployment_estimates"] = estimates
        section["targets"] += [
            {
                **_check(estimate, "round_seconds_vs_plain", MASKING_TIME_TARGET),
                "derived": True,
            }
            for estimate in estimates
            if estimate["variant"] == "masking" and estimate["sites"] == TARGET_SITES
        ]
    # Per-site records of every round would make the file megabytes long, so
    # each round keeps only its round-level figures.
    section["rounds"] = [
        {
            "model": cell.model,
            "sites": len(cell.sites),
            "variant": cell.variant,
            **{key: value for key, value in record.items() if key != "site_results"},
        }
        for cell in cells
        for record in cell.rounds
    ]

    if arguments.train:
        document = {**previous, TRAIN_KEY: section}
    elif arguments.site_wait:
        document = {**previous, WAIT_KEY: section}
    else:
        document = section
        for key in (TRAIN_KEY, WAIT_KEY):
            if key in previous:
                document[key] = previous[key]
    print_rows(rows)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {arguments.output} in {section['wall_seconds']:.0f} s")


def site_waits(
    previous: dict[str, Any], groups: list[tuple[str, int]]
) -> dict[tuple[str, int], float]:
    """Return each group's median site training CPU time from the ``--train`` run.

    Raises:
        SystemExit: the output file has no ``--train`` figures for a group.
    """
    rows = previous.get(TRAIN_KEY, {}).get("results", [])
    waits = {}
    for model, count in groups:
        times = [
            row["train_cpu_seconds_median"]
            for row in rows
            if (row["model"], row["sites"]) == (model, count)
        ]
        if not times:
            raise SystemExit(
                f"no --train figures for {model} at {count} sites in the output "
                "file; run this script with --train first"
            )
        waits[(model, count)] = statistics.median(times)
    return waits


def training_description() -> dict[str, Any]:
    """Return what the ``--train`` sites do, for the JSON results."""
    pneumonia = study_config("resnet_gn", 4, "none").data
    heart = study_config("logistic_regression", 4, "none").data
    return {
        "training": {
            "function": "medfed.sites.training.train_locally",
            "settings": {
                "epochs": TRAINING_SETTINGS.epochs,
                "batch_size": TRAINING_SETTINGS.batch_size,
                "learning_rate": TRAINING_SETTINGS.learning_rate,
                "dp": False,
            },
            "torch_threads_per_site": 1,
            "seed": "crc32 of '<site id>:<round>', the same in every variant",
            "data": {
                "resnet_gn": (
                    f"IID share (seed {pneumonia.seed}) of the PneumoniaMNIST "
                    "training split, "
                    f"first {MAX_IMAGES_PER_SITE} images at most, scaled to [0, 1]"
                ),
                "logistic_regression": (
                    f"IID share (seed {heart.seed}) of the four hospitals' "
                    "heart-disease training records, each hospital preprocessed "
                    f"with preprocess_heart_site (test_fraction {heart.test_fraction}, "
                    f"seed {heart.seed})"
                ),
            },
            "sample_count": "the site's training records",
            "train_seconds": "wall time of train_locally in the site thread",
            "train_cpu_seconds": "CPU time of the site thread in train_locally",
        },
        "deployment_estimates_basis": (
            "derived, not measured: median site train_cpu_seconds of this run "
            "plus the variant's protocol-only median round time from the "
            "top-level results of this file"
        ),
    }


def print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        training = (
            f" training {row['train_cpu_seconds_median']:.3f} s CPU"
            if "train_cpu_seconds_median" in row
            else ""
        )
        print(
            f"{row['model']:20s} {row['sites']:3d} {row['variant']:18s} "
            f"round {row['round_seconds_median']:7.3f} s "
            f"({row['round_seconds_vs_plain']:5.2f}x){training} "
            f"sent {row['bytes_sent_max_site']:>9d} B "
            f"({row['bytes_sent_max_site_vs_plain']:7.2f}x)"
        )


if __name__ == "__main__":
    main()
