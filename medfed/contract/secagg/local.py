"""An in-process masking round: every site and the service in one process.

Messages pass through their JSON form, as they would over HTTP, so this
driver also checks that every message survives serialization. Tests and the
cost benchmark use it; a deployment runs the same calls across the network.
"""

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from medfed.contract.secagg.layout import VectorLayout
from medfed.contract.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    KeyRoster,
    RevealedShares,
    RevealRequest,
    ShareUpload,
    parse_message,
)
from medfed.contract.secagg.ring import RingEncoding
from medfed.contract.secagg.server import MaskingServer, UnmaskedSum
from medfed.contract.secagg.site import MaskingSite

__all__ = ["LocalRound", "run_masking_round"]


@dataclass
class LocalRound:
    """The outcome of a local round and the data the service received.

    Attributes:
        result: the unmasked sum.
        masked_vectors: each survivor's masked ring vector, as the service
            received it.
        sent_bytes: per site, the JSON bytes of its protocol messages
            (advertisement, share upload, revealed shares), not counting the
            masked vector.
        received_bytes: per site, the JSON bytes the service sent it (roster,
            relayed shares, reveal request).
    """

    result: UnmaskedSum
    masked_vectors: dict[str, np.ndarray]
    sent_bytes: dict[str, int] = field(default_factory=dict)
    received_bytes: dict[str, int] = field(default_factory=dict)


def run_masking_round(
    updates: Mapping[str, Mapping[str, np.ndarray]],
    sample_counts: Mapping[str, int],
    *,
    study: str,
    round_number: int,
    threshold: int,
    encoding: RingEncoding,
    drop_before_upload: Collection[str] = (),
    drop_before_reveal: Collection[str] = (),
    rng: np.random.Generator | None = None,
) -> LocalRound:
    """Run one masking round over ``updates`` (site id to tensors).

    Args:
        drop_before_upload: sites that share keys, then never upload.
        drop_before_reveal: sites that upload, then never reveal shares.

    Raises:
        SecureAggregationError: the round cannot be unmasked, for example with
            fewer than ``threshold`` survivors.
    """
    layout = VectorLayout.of(next(iter(updates.values())))
    sites = {
        site: MaskingSite(
            site=site, study=study, round_number=round_number, encoding=encoding
        )
        for site in sorted(updates)
    }
    server = MaskingServer(
        study=study,
        round_number=round_number,
        threshold=threshold,
        encoding=encoding,
        vector_length=layout.length,
    )
    sent = dict.fromkeys(sites, 0)
    received = dict.fromkeys(sites, 0)

    for name, site in sites.items():
        text = site.advertise().model_dump_json()
        sent[name] += len(text)
        server.add_advertisement(parse_message(KeyAdvertisement, text))
    roster_text = server.close_advertising().model_dump_json()

    for name, site in sites.items():
        received[name] += len(roster_text)
        upload_text = site.share_keys(
            parse_message(KeyRoster, roster_text)
        ).model_dump_json()
        sent[name] += len(upload_text)
        server.add_share_upload(parse_message(ShareUpload, upload_text))
    server.close_sharing()

    masked_vectors = {}
    for name, site in sites.items():
        relayed = [share.model_dump_json() for share in server.shares_for(name)]
        received[name] += sum(len(text) for text in relayed)
        site.receive_shares([parse_message(EncryptedShare, text) for text in relayed])
        if name in drop_before_upload:
            continue
        masked = layout.join(
            site.mask_update(updates[name], sample_count=sample_counts[name], rng=rng)
        )
        masked_vectors[name] = masked
        server.add_masked_update(name, masked, sample_count=sample_counts[name])
    request_text = server.close_uploads().model_dump_json()

    for name in parse_message(RevealRequest, request_text).survivors:
        if name in drop_before_reveal:
            continue
        received[name] += len(request_text)
        reveal_text = sites[name].reveal(request_text).model_dump_json()
        sent[name] += len(reveal_text)
        server.add_reveal(parse_message(RevealedShares, reveal_text))
    return LocalRound(
        result=server.unmask(),
        masked_vectors=masked_vectors,
        sent_bytes=sent,
        received_bytes=received,
    )
