"""Masking studies in which sites fail, through the real flow.

A site whose training fails has already shared its keys, so the study goes
on only if the site withdraws and the others unmask without it before the
round's deadline. A site that dies without withdrawing is withdrawn by the
coordinator once its task fails. A site that could not prepare must not be
waited for.
"""

import json
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml

from medfed.contract.config import StudyConfig, parse_study_config
from medfed.contract.secagg import MaskingSite
from medfed.errors import ServiceError
from medfed.flows import training as training_flow
from medfed.flows.training import run_study
from medfed.sites import runner as site_runner
from medfed.sites.secagg_client import BackgroundMaskingRound, MaskingClient
from medfed.sites.training import train_locally
from tests.conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

ALL_SITES = ["cleveland", "hungary", "long-beach", "switzerland"]
SURVIVORS = ["cleveland", "long-beach", "switzerland"]
# A round that waited for its deadline would take this long, and the rounds
# here take a few seconds.
DEADLINE_SECONDS = 60
# The round deadline of the study with a dead site, and how long its live
# sites wait for the round there before they give up. A flow that waited for
# the dead site would make them give up, so the test fails after about
# SITE_WAIT_SECONDS instead of waiting for Prefect's site threads until the
# deadline. The test's timeout stops a run that hangs in some other way.
DEAD_SITE_DEADLINE_SECONDS = 600
SITE_WAIT_SECONDS = 180


def heart_study(
    study: str,
    secure_aggregation: Any,
    quorum: int | None = None,
    deadline_seconds: float = DEADLINE_SECONDS,
) -> tuple[StudyConfig, str]:
    raw: dict[str, Any] = yaml.safe_load(
        (CONFIGS / "heart_disease_nodp.yaml").read_text()
    )
    raw["study"] = study
    raw["training"]["rounds"] = 2
    raw["round"]["deadline_seconds"] = deadline_seconds
    raw["secure_aggregation"] = secure_aggregation
    if quorum is not None:
        raw["round"]["quorum"] = quorum
    return parse_study_config(raw), yaml.safe_dump(raw)


MASKING = {"mode": "masking", "clip": 10.0, "max_weight": 1000, "fractional_bits": 14}


def fail_once(
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
    sites: tuple[str, ...] = ("hungary",),
    in_round: int = 0,
) -> list[int]:
    """Make round ``in_round`` of ``sites`` fail; return the rounds that failed.

    With ``after_key_setup`` the site's training fails only once the site has
    exchanged its masking keys, so the round must wait for its upload.
    """
    failed_in: list[int] = []
    failed_sites: set[str] = set()
    training_site = threading.local()
    train_round = site_runner.SiteRunner.train_round
    keys_exchanged = {site: threading.Event() for site in sites}
    set_up = MaskingClient.set_up

    def set_up_noting_site(
        client: MaskingClient, site: MaskingSite, *, wait_seconds: float
    ) -> Any:
        setup = set_up(client, site, wait_seconds=wait_seconds)
        if site.site in sites and site.context.round_number == in_round:
            keys_exchanged[site.site].set()
        return setup

    def train_round_noting_site(runner, client, round_number):
        training_site.name = runner.site_id
        training_site.round = round_number
        return train_round(runner, client, round_number)

    def train_failing_once(*args: Any, **kwargs: Any) -> Any:
        site = getattr(training_site, "name", None)
        if site not in sites or site in failed_sites or training_site.round != in_round:
            return train_locally(*args, **kwargs)
        failed_sites.add(site)
        failed_in.append(training_site.round)
        if failure == "before_training":
            raise RuntimeError("CUDA error: device lost")
        if failure == "after_key_setup":
            keys_exchanged[site].wait(timeout=120)
            raise RuntimeError("site process killed")
        result = train_locally(*args, **kwargs)
        if failure == "after_training":
            raise RuntimeError("CUDA error: device lost")
        # Training diverged: the update cannot be encoded for masking.
        with torch.no_grad():
            for parameter in args[0].parameters():
                parameter.fill_(float("nan"))
        return result

    monkeypatch.setattr(site_runner, "train_locally", train_failing_once)
    monkeypatch.setattr(site_runner.SiteRunner, "train_round", train_round_noting_site)
    monkeypatch.setattr(MaskingClient, "set_up", set_up_noting_site)
    return failed_in


def block_own_withdrawal(
    monkeypatch: pytest.MonkeyPatch, dead_site: str, in_round: int = 0
) -> None:
    """Make ``dead_site``'s own withdrawal from round ``in_round`` fail.

    It simulates a site whose process was killed or lost its network, so
    its withdrawal never reaches the service.
    """
    withdraw = MaskingClient.withdraw

    def withdraw_unless_dead(client: MaskingClient, site: MaskingSite) -> None:
        if site.site != dead_site or site.context.round_number != in_round:
            withdraw(client, site)
            return
        raise ServiceError(
            f"aggregation service at {client.base_url} is unreachable (POST "
            f"withdrawals/{dead_site}): [Errno 111] Connection refused"
        )

    monkeypatch.setattr(MaskingClient, "withdraw", withdraw_unless_dead)


@pytest.mark.parametrize("failure", ["before_training", "after_training", "nan_update"])
def test_failed_site_withdraws_from_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    failed_in = fail_once(monkeypatch, failure)
    config, text = heart_study(f"mask-fault-{failure.replace('_', '-')}", MASKING)

    started = time.monotonic()
    summary = run_study(config, text, work_dir=tmp_path)
    elapsed = time.monotonic() - started

    assert failed_in == [0]
    first, second = summary["participants"]
    assert first["state"] == "finalized"
    assert first["uploaded"] == SURVIVORS
    assert second["state"] == "finalized"
    assert second["uploaded"] == ALL_SITES
    assert summary["model_version"] == 2
    assert elapsed < DEADLINE_SECONDS


class ImpatientMaskingRound(BackgroundMaskingRound):
    """A site's masking round that waits at most ``SITE_WAIT_SECONDS`` in all."""

    def __init__(self, *args: Any, wait_seconds: float, **kwargs: Any) -> None:
        super().__init__(
            *args, wait_seconds=min(wait_seconds, SITE_WAIT_SECONDS), **kwargs
        )


@pytest.mark.timeout(300)
def test_dead_site_withdrawn_by_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed_in = fail_once(monkeypatch, "after_key_setup")
    block_own_withdrawal(monkeypatch, "hungary")
    monkeypatch.setattr(site_runner, "BackgroundMaskingRound", ImpatientMaskingRound)
    config, text = heart_study(
        "mask-fault-dead-site", MASKING, deadline_seconds=DEAD_SITE_DEADLINE_SECONDS
    )

    summary = run_study(config, text, work_dir=tmp_path)

    assert failed_in == [0]
    assert summary["withdrawals"] == [{"round": 0, "site": "hungary"}]
    first, second = summary["participants"]
    assert first["state"] == "finalized"
    assert first["uploaded"] == SURVIVORS
    assert second["state"] == "finalized"
    assert second["uploaded"] == ALL_SITES
    audit_log = tmp_path / "aggregation" / "audit.jsonl"
    entries = [json.loads(line) for line in audit_log.read_text().splitlines()]
    withdrawals = [
        (entry["actor"], entry["details"])
        for entry in entries
        if entry["event"] == "site.withdrawn"
    ]
    # The site exchanged its keys before it died, so the round was uploading.
    assert withdrawals == [
        (
            "coordinator",
            {
                "study": "mask-fault-dead-site",
                "round": 0,
                "site": "hungary",
                "phase": "uploading",
            },
        )
    ]


def test_survivors_sum_matches_plain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both studies share one name because the sites' training seeds derive
    # from it, so they differ only by the fixed-point error of the mean.
    name = "mask-fault-sum"
    plain_config, plain_text = heart_study(name, "none")
    masked_config, masked_text = heart_study(name, MASKING)

    fail_once(monkeypatch, "after_training")
    plain = run_study(plain_config, plain_text, work_dir=tmp_path / "plain")
    fail_once(monkeypatch, "after_training")
    masked = run_study(masked_config, masked_text, work_dir=tmp_path / "masked")

    inputs = np.random.default_rng(0).normal(size=(50, 15)).tolist()
    plain_scores = mlflow.pyfunc.load_model(
        f"models:/{name}/{plain['registered_model_version']}"
    ).predict(inputs)
    masked_scores = mlflow.pyfunc.load_model(
        f"models:/{name}/{masked['registered_model_version']}"
    ).predict(inputs)
    assert masked["participants"] == plain["participants"]
    assert masked["participants"][0]["uploaded"] == SURVIVORS
    assert np.max(np.abs(masked_scores - plain_scores)) < 1e-4


@pytest.mark.parametrize("quorum", [2, 3])
def test_round_below_threshold_aborts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quorum: int
) -> None:
    # Two of four sites fail in round 1, so at most two upload: below the
    # threshold of 3. With quorum 2 the service round has its quorum but
    # cannot be unmasked.
    failed_in = fail_once(
        monkeypatch, "after_training", ("hungary", "long-beach"), in_round=1
    )
    config, text = heart_study(f"mask-fault-quorum{quorum}", MASKING, quorum=quorum)

    started = time.monotonic()
    summary = run_study(config, text, work_dir=tmp_path)
    elapsed = time.monotonic() - started

    assert failed_in == [1, 1]
    first, second = summary["participants"]
    assert first["state"] == "finalized"
    assert second["state"] == "aborted"
    assert summary["model_version"] == 1
    assert elapsed < DEADLINE_SECONDS


def test_unprepared_site_skipped_by_masking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_site = training_flow.prepare_site

    def prepare_failing_hungary(runner: Any) -> Any:
        if runner.site_id == "hungary":
            # Not a data error, so the study goes on without the site.
            raise RuntimeError("site container is not running")
        return prepare_site(runner)

    monkeypatch.setattr(training_flow, "prepare_site", prepare_failing_hungary)
    config, text = heart_study("mask-fault-unprepared", MASKING)

    started = time.monotonic()
    summary = run_study(config, text, work_dir=tmp_path)
    elapsed = time.monotonic() - started

    for participation in summary["participants"]:
        assert participation["state"] == "finalized"
        assert participation["uploaded"] == SURVIVORS
    assert summary["model_version"] == 2
    assert elapsed < DEADLINE_SECONDS


# The round deadline of the study with a hung site, far longer than the
# round takes once the masking round drops the site, and the key-exchange
# deadline that drops it.
HUNG_SITE_DEADLINE_SECONDS = 300
HUNG_SITE_KEY_EXCHANGE_SECONDS = 3
# How long the hung site waits before its task fails on its own. A flow that
# waited for the task would finish round 0 after about this long.
HUNG_SITE_RELEASE_SECONDS = 120


@pytest.mark.timeout(300)
def test_hung_site_dropped_before_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    released = threading.Event()
    hung_in: list[int] = []
    train_round = site_runner.SiteRunner.train_round

    def train_round_hanging(runner: Any, client: Any, round_number: int) -> Any:
        if runner.site_id != "hungary" or round_number != 0:
            return train_round(runner, client, round_number)
        hung_in.append(round_number)
        # The site hangs before it starts its masking round, so it never
        # advertises keys. It ends after round 0 so the flow can end.
        released.wait(timeout=HUNG_SITE_RELEASE_SECONDS)
        raise RuntimeError("site process hung")

    monkeypatch.setattr(site_runner.SiteRunner, "train_round", train_round_hanging)
    round_seconds: dict[int, float] = {}
    started = time.monotonic()

    def note_round(round_number: int, _: dict[str, Any]) -> None:
        round_seconds[round_number] = time.monotonic() - started
        released.set()

    config, text = heart_study(
        "mask-fault-hung-site",
        {**MASKING, "key_exchange_seconds": HUNG_SITE_KEY_EXCHANGE_SECONDS},
        deadline_seconds=HUNG_SITE_DEADLINE_SECONDS,
    )
    summary = run_study(config, text, work_dir=tmp_path, listener=note_round)

    assert hung_in == [0]
    # Round 0 includes preparing the sites, training and evaluating, which
    # take a few seconds here.
    assert round_seconds[0] < HUNG_SITE_RELEASE_SECONDS / 2
    first, second = summary["participants"]
    assert first["state"] == "finalized"
    assert first["uploaded"] == SURVIVORS
    assert second["state"] == "finalized"
    assert second["uploaded"] == ALL_SITES
    assert [(d["round"], d["site"]) for d in summary["dropped"]] == [(0, "hungary")]
    assert "did not advertise its keys" in summary["dropped"][0]["message"]
    assert summary["withdrawals"] == []
    assert summary["model_version"] == 2
