"""The masking route for masked envelopes applies the upload route's checks.

A site may send its masked envelope to ``PUT .../secagg/masked/{site}`` as
well as to its upload route. On the aggregation service both must check the
envelope's signature, count it towards the round's quorum and audit it, so
the masking route is no way around the signature check.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medfed.contract.kits import site_kit_name
from medfed.contract.wire import encode_envelope

from .federation import STUDY, client, site_delta
from .processes import ServiceProcess
from .test_masking_restart import (
    ENCODING,
    PREFIX,
    SITES,
    ManualSite,
    create_study,
    masking_kits,
    sample_count,
)

__all__ = ["masking_kits"]


def masked_envelopes(site: ManualSite) -> tuple[bytes, bytes]:
    """Mask the site's update once; return it unsigned and signed."""
    masked = site.protocol.mask_update(
        site_delta(site.name, 0), sample_count=sample_count(site.name)
    )
    unsigned, signed = (
        encode_envelope(
            masked,
            study=STUDY,
            round_number=0,
            site=site.name,
            sample_count=sample_count(site.name),
            nonce=f"{sum(site.name.encode()):032x}",
            codec_name="masked",
            codec_params=ENCODING.codec_params,
            signer=signer,
        )
        for signer in (None, site.signer)
    )
    return unsigned, signed


def test_masked_route_checks_signature(
    masking_kits: dict[str, Path], tmp_path: Path
) -> None:
    service = ServiceProcess(tmp_path, masking_kits["aggregation"]).start()
    sites = [
        ManualSite(service.url, masking_kits[site_kit_name(name)], name)
        for name in SITES
    ]
    try:
        create_study(service.url, masking_kits)
        for site in sites:
            site.advertise()
        with ThreadPoolExecutor(len(sites)) as pool:
            for future in [pool.submit(site.share) for site in sites]:
                future.result(timeout=60)
        gamma = sites[-1]
        path = f"{PREFIX}/masked/{gamma.name}"

        unsigned_envelope, signed_envelope = masked_envelopes(gamma)

        unsigned = gamma.http.put(path, content=unsigned_envelope)
        signed = gamma.http.put(path, content=signed_envelope)

        with client(service.url, masking_kits["coordinator"]) as coordinator:
            status = coordinator.get(f"/v1/studies/{STUDY}/rounds/0").json()
    finally:
        for site in sites:
            site.close()
        service.stop()

    assert unsigned.status_code == 403, unsigned.text
    assert "is unsigned" in unsigned.json()["detail"]
    assert signed.status_code == 200, signed.text
    assert "receipt" in signed.json()
    assert status["uploaded"] == [gamma.name]
    entries = [
        json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()
    ]
    verdicts = [
        entry["event"]
        for entry in entries
        if entry["event"].startswith("update.") and entry.get("actor") == gamma.name
    ]
    assert verdicts == ["update.rejected", "update.accepted"]
