"""The aggregation service's side of a masking round: relay, collect, unmask.

The service learns the sum of the survivors' encoded updates and nothing
else, provided at least ``threshold`` sites follow the protocol. It holds
only public keys, ciphertexts it cannot open, masked vectors, and the shares
survivors reveal once uploads close: self-mask shares of survivors and
mask-key shares of dropped sites.

Each method is valid in one phase, and the phases run in this order:

1. ``add_advertisement``, then ``close_advertising`` returns the roster.
2. ``add_share_upload``, then ``close_sharing``.
3. ``shares_for`` and ``add_masked_update``, then ``close_uploads`` returns
   the reveal request.
4. ``add_reveal``, then ``unmask``.

A rejected message raises ``SecureAggregationError`` and changes no state.
"""

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from medfed.contract.ids import validate_identifier
from medfed.contract.secagg.keys import (
    RoundContext,
    decode_key,
    public_key_bytes,
    self_mask_commitment,
)
from medfed.contract.secagg.masks import pairwise_mask, self_mask
from medfed.contract.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    KeyRoster,
    RevealedShares,
    RevealRequest,
    ShareUpload,
    ShareValue,
    check_threshold,
    parse_message,
)
from medfed.contract.secagg.ring import RingEncoding, from_ring
from medfed.contract.secagg.shamir import Share, rebuild_verified
from medfed.contract.secagg.signing import verify_advertisement
from medfed.errors import ConfigError, SecureAggregationError

__all__ = [
    "AdvertisementSignatureError",
    "MaskingServer",
    "RoundNotReadyError",
    "UnmaskedSum",
]

logger = logging.getLogger(__name__)

_STATE_FORMAT = "medfed-masking-round/1"


class _Phase(Enum):
    ADVERTISING = 1
    SHARING = 2
    UPLOADING = 3
    REVEALING = 4
    DONE = 5


class RoundNotReadyError(SecureAggregationError):
    """The round has not reached the phase a request needs yet; retry later."""


class AdvertisementSignatureError(SecureAggregationError):
    """A key advertisement is unsigned, wrongly signed, or from a site without a verify key."""


@dataclass(frozen=True)
class UnmaskedSum:
    """The survivors' aggregate, the only thing a masking round releases.

    Attributes:
        ring_sum: the sum of the survivors' ring vectors, shape ``(length,)``.
        weighted_sum: ``ring_sum`` decoded to float64: the sum over survivors
            of sample count times clipped update.
        sample_count: the survivors' total sample count.
        survivors: the sites whose updates the sum contains, sorted.
    """

    ring_sum: np.ndarray
    weighted_sum: np.ndarray
    sample_count: int
    survivors: tuple[str, ...]

    def mean(self) -> np.ndarray:
        """Return the sample-weighted mean update as a float64 vector."""
        return self.weighted_sum / self.sample_count


class MaskingServer:
    """Round state of one masking round at the aggregation service.

    Args:
        study: the study id.
        round_number: the round.
        threshold: the Shamir threshold t; more than half of the roster.
        encoding: the round's ring encoding (fixed point or int8 levels).
        vector_length: the number of coordinates of every update.
        verify_keys: the Ed25519 verify key of every site of the study; when
            set, unsigned or wrongly signed advertisements are rejected.
    """

    def __init__(
        self,
        *,
        study: str,
        round_number: int,
        threshold: int,
        encoding: RingEncoding,
        vector_length: int,
        verify_keys: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        if not isinstance(vector_length, int) or vector_length < 1:
            raise ConfigError(
                f"vector_length must be a positive integer, got {vector_length!r}"
            )
        self.context = RoundContext(
            validate_identifier(study, kind="study"), round_number
        )
        self.threshold = threshold
        self.encoding = encoding
        self.vector_length = vector_length
        self._verify_keys = verify_keys
        self._phase = _Phase.ADVERTISING
        self._advertisements: dict[str, KeyAdvertisement] = {}
        self._roster: KeyRoster | None = None
        self._share_uploads: dict[str, ShareUpload] = {}
        self._masked: dict[str, np.ndarray] = {}
        self._sample_counts: dict[str, int] = {}
        self._withdrawn: set[str] = set()
        self._request: RevealRequest | None = None
        self._reveals: dict[str, RevealedShares] = {}

    def add_advertisement(self, advertisement: KeyAdvertisement) -> None:
        """Record a site's public keys.

        Raises:
            AdvertisementSignatureError: verify keys are set, and the site has
                none or its signature is missing or does not verify.
            SecureAggregationError: the site already advertised, withdrew, or
                reuses a public key another site advertised.
        """
        self._require(_Phase.ADVERTISING, "accept key advertisements")
        if self._verify_keys is not None:
            verify_key = self._verify_keys.get(advertisement.site)
            if verify_key is None:
                raise AdvertisementSignatureError(
                    f"site {advertisement.site!r} has no known verify key in this study"
                )
            try:
                verify_advertisement(advertisement, verify_key, self.context)
            except SecureAggregationError as error:
                raise AdvertisementSignatureError(str(error)) from None
        if advertisement.site in self._withdrawn:
            raise SecureAggregationError(
                f"site {advertisement.site!r} withdrew from this round; it can "
                "take part again in the next round"
            )
        if advertisement.site in self._advertisements:
            raise SecureAggregationError(
                f"site {advertisement.site!r} already advertised its keys this round"
            )
        known_keys = {
            key
            for item in self._advertisements.values()
            for key in (item.mask_public_key, item.share_public_key)
        }
        if {advertisement.mask_public_key, advertisement.share_public_key} & known_keys:
            raise SecureAggregationError(
                f"site {advertisement.site!r} advertised a public key another site "
                "already uses"
            )
        self._advertisements[advertisement.site] = advertisement

    def close_advertising(self) -> KeyRoster:
        """Freeze the roster that every site receives.

        Raises:
            SecureAggregationError: too few sites advertised for the threshold,
                or more than the encoding is sized for.
        """
        self._require(_Phase.ADVERTISING, "close advertising")
        count = len(self._advertisements)
        try:
            check_threshold(self.threshold, count)
        except ConfigError as error:
            raise SecureAggregationError(
                f"cannot start the round with {count} sites: {error}"
            ) from None
        if count > self.encoding.site_count:
            raise SecureAggregationError(
                f"{count} sites advertised keys but the encoding is sized for at "
                f"most {self.encoding.site_count}; the sum could wrap around"
            )
        self._roster = KeyRoster(
            study=self.context.study,
            round=self.context.round_number,
            threshold=self.threshold,
            advertisements=[
                self._advertisements[site] for site in sorted(self._advertisements)
            ],
        )
        self._phase = _Phase.SHARING
        return self._roster

    def add_share_upload(self, upload: ShareUpload) -> None:
        """Store a site's encrypted shares for relaying.

        Raises:
            SecureAggregationError: the sender is not in the roster, already
                uploaded, or its shares do not address every other site once.
        """
        self._require(_Phase.SHARING, "accept shares")
        roster = self._current_roster()
        if upload.sender not in roster.sites:
            raise SecureAggregationError(
                f"site {upload.sender!r} is not in the round's roster"
            )
        if upload.sender in self._share_uploads:
            raise SecureAggregationError(
                f"site {upload.sender!r} already uploaded its shares"
            )
        if upload.sender in self._withdrawn:
            raise SecureAggregationError(
                f"site {upload.sender!r} withdrew from this round; it can take "
                "part again in the next round"
            )
        if any(share.sender != upload.sender for share in upload.shares):
            raise SecureAggregationError(
                f"share upload from {upload.sender!r} contains another site's share"
            )
        recipients = sorted(share.recipient for share in upload.shares)
        expected = [site for site in roster.sites if site != upload.sender]
        if recipients != expected:
            raise SecureAggregationError(
                f"share upload from {upload.sender!r} must address each other "
                f"roster site once: expected {expected}, got {recipients}"
            )
        self._share_uploads[upload.sender] = upload

    def close_sharing(self) -> None:
        """End the share phase: the sites that uploaded shares form the round.

        Raises:
            SecureAggregationError: fewer than ``threshold`` sites uploaded
                shares.
        """
        self._require(_Phase.SHARING, "close sharing")
        if len(self._share_uploads) < self.threshold:
            raise SecureAggregationError(
                f"only {len(self._share_uploads)} sites uploaded shares, fewer "
                f"than the threshold {self.threshold}; the round cannot go on"
            )
        self._phase = _Phase.UPLOADING

    @property
    def phase_name(self) -> str:
        """The current phase: advertising, sharing, uploading, revealing or done."""
        return self._phase.name.lower()

    @property
    def advertised_sites(self) -> list[str]:
        """The sites that advertised keys so far, sorted."""
        return sorted(self._advertisements)

    @property
    def roster(self) -> KeyRoster:
        """The roster; raises ``RoundNotReadyError`` before advertising closed."""
        return self._current_roster()

    @property
    def reveal_request(self) -> RevealRequest:
        """The reveal request; raises ``RoundNotReadyError`` before uploads closed."""
        return self._current_request()

    @property
    def uploaded_sites(self) -> list[str]:
        """The sites whose masked update arrived, sorted."""
        return sorted(self._masked)

    @property
    def sharing_sites(self) -> list[str]:
        """The sites that uploaded shares, sorted: the only ones that may upload."""
        return sorted(self._share_uploads)

    @property
    def withdrawn_sites(self) -> list[str]:
        """The sites that withdrew from the round, sorted."""
        return sorted(self._withdrawn)

    @property
    def revealed_sites(self) -> list[str]:
        """The survivors whose revealed shares arrived, sorted."""
        return sorted(self._reveals)

    @property
    def sharing_complete(self) -> bool:
        """Whether every roster site has uploaded shares or withdrawn."""
        if self._phase is not _Phase.SHARING:
            return False
        roster = set(self._current_roster().sites)
        return roster <= set(self._share_uploads) | self._withdrawn

    @property
    def uploads_complete(self) -> bool:
        """Whether uploads can close now, with no site left to wait for.

        True in the upload phase once every site that shared keys has
        uploaded or withdrawn, and at least ``threshold`` sites uploaded.
        """
        awaited = set(self._share_uploads) - set(self._masked) - self._withdrawn
        return (
            self._phase is _Phase.UPLOADING
            and not awaited
            and len(self._masked) >= self.threshold
        )

    @property
    def upload_candidates(self) -> list[str]:
        """The sites that uploaded or may still upload, sorted.

        These are the sites that advertised keys while advertising, the
        roster while sharing, the sites that shared keys during uploads, and
        the sites that uploaded after uploads closed. Withdrawn sites are
        left out.
        """
        if self._phase is _Phase.ADVERTISING:
            candidates = set(self._advertisements)
        elif self._phase is _Phase.SHARING:
            candidates = set(self._current_roster().sites)
        elif self._phase is _Phase.UPLOADING:
            candidates = set(self._share_uploads)
        else:
            candidates = set(self._masked)
        return sorted(candidates - self._withdrawn)

    @property
    def threshold_reachable(self) -> bool:
        """Whether enough sites can still upload for the round to be unmasked.

        False once withdrawals leave fewer than ``threshold`` upload
        candidates, so the round can only be aborted.
        """
        return len(self.upload_candidates) >= self.threshold

    def withdraw(self, site: str) -> None:
        """Record that ``site`` will not upload this round.

        A site that withdraws while advertising leaves the roster, and one
        that has not advertised yet may no longer do so this round, so
        advertising stops waiting for it. One that withdraws later is dropped like a site that went silent: the share
        phase and the upload phase close without waiting for it, not at the
        round's deadline. Withdrawing again changes nothing.

        The site itself or the coordinator may send the withdrawal, the
        coordinator for a site that died without sending it. Either way a
        withdrawal after the site's upload is rejected. Otherwise the reveal
        request would list as dropped a site whose masked update the service
        stores, the other sites would reveal its mask-key shares, and only its
        self-mask would still hide its update. The rejection, together with
        the rejection of uploads from withdrawn sites, means the service never
        stores both a site's masked update and the shares of its mask key.

        Raises:
            SecureAggregationError: the site is not in the roster (while
                sharing), did not
                share keys (while uploading), already uploaded, or uploads are
                closed.
        """
        if site in self._withdrawn:
            return
        if self._phase is _Phase.ADVERTISING:
            self._advertisements.pop(site, None)
        elif self._phase is _Phase.SHARING:
            if site not in self._current_roster().sites:
                raise SecureAggregationError(
                    f"site {site!r} is not in the round's roster, so it has "
                    "nothing to withdraw from"
                )
        elif self._phase is _Phase.UPLOADING:
            if site not in self._share_uploads:
                raise SecureAggregationError(
                    f"site {site!r} did not upload shares, so it has nothing to "
                    "withdraw from"
                )
            if site in self._masked:
                raise SecureAggregationError(
                    f"site {site!r} already uploaded this round, so it cannot be "
                    "withdrawn: its update is part of the round's sum"
                )
        else:
            raise SecureAggregationError(
                f"round {self.context.round_number} cannot accept a withdrawal in "
                f"phase {self._phase.name.lower()}; uploads are closed"
            )
        self._withdrawn.add(site)

    def shares_for(self, site: str) -> list[EncryptedShare]:
        """Return the encrypted shares addressed to ``site`` from sharing sites."""
        self._require(_Phase.UPLOADING, "relay shares")
        if site not in self._share_uploads:
            raise SecureAggregationError(
                f"site {site!r} did not upload shares and takes no further part"
            )
        return [
            share
            for sender in self.sharing_sites
            if sender != site
            for share in self._share_uploads[sender].shares
            if share.recipient == site
        ]

    def add_masked_update(
        self, site: str, vector: np.ndarray, *, sample_count: int
    ) -> None:
        """Store a site's masked ring vector and its sample count.

        Raises:
            SecureAggregationError: the site did not share keys, already
                uploaded, or the vector has the wrong shape or dtype, or the
                sample count is outside 1 to ``max_weight``.
        """
        self._require(_Phase.UPLOADING, "accept masked updates")
        if site not in self._share_uploads:
            raise SecureAggregationError(
                f"site {site!r} did not upload shares, so its masked update "
                "cannot be unmasked"
            )
        if site in self._masked:
            raise SecureAggregationError(f"site {site!r} already uploaded this round")
        if site in self._withdrawn:
            raise SecureAggregationError(
                f"site {site!r} withdrew from this round, so its update is not "
                "accepted; it can take part again in the next round"
            )
        array = np.asarray(vector)
        if array.shape != (self.vector_length,) or array.dtype != self.encoding.dtype:
            raise SecureAggregationError(
                f"masked update from {site!r} has shape {list(array.shape)} and "
                f"dtype {array.dtype}, expected [{self.vector_length}] "
                f"{self.encoding.dtype}"
            )
        if (
            not isinstance(sample_count, int)
            or not 1 <= sample_count <= self.encoding.max_weight
        ):
            raise SecureAggregationError(
                f"sample_count from {site!r} must be from 1 to max_weight "
                f"{self.encoding.max_weight}, got {sample_count!r}"
            )
        self._masked[site] = array.copy()
        self._sample_counts[site] = sample_count

    def close_uploads(self) -> RevealRequest:
        """End the upload phase and return the request every survivor receives.

        Sites that shared keys but did not upload count as dropped.

        Raises:
            SecureAggregationError: fewer than ``threshold`` sites uploaded; no
                request is issued, so no share is revealed.
        """
        self._require(_Phase.UPLOADING, "close uploads")
        survivors = sorted(self._masked)
        if len(survivors) < self.threshold:
            raise SecureAggregationError(
                f"only {len(survivors)} sites uploaded masked updates, fewer than "
                f"the threshold {self.threshold}; the round is abandoned and "
                "nothing is unmasked"
            )
        dropped = [site for site in self.sharing_sites if site not in self._masked]
        self._request = RevealRequest(
            study=self.context.study,
            round=self.context.round_number,
            survivors=survivors,
            dropped=dropped,
        )
        self._phase = _Phase.REVEALING
        logger.info(
            "round %s closed uploads: %s survivors, %s dropped",
            self.context.round_number,
            len(survivors),
            len(dropped),
        )
        return self._request

    def add_reveal(self, revealed: RevealedShares) -> None:
        """Store a survivor's revealed shares.

        Raises:
            SecureAggregationError: the site is not a survivor, already
                revealed, or revealed other sites or indexes than requested.
        """
        self._require(_Phase.REVEALING, "accept revealed shares")
        request = self._current_request()
        roster = self._current_roster()
        if revealed.site not in request.survivors:
            raise SecureAggregationError(
                f"site {revealed.site!r} is not a survivor of this round"
            )
        if revealed.site in self._reveals:
            raise SecureAggregationError(
                f"site {revealed.site!r} already revealed its shares"
            )
        if sorted(revealed.self_mask_shares) != request.survivors or sorted(
            revealed.mask_key_shares
        ) != list(request.dropped):
            raise SecureAggregationError(
                f"site {revealed.site!r} must reveal self-mask shares of exactly "
                "the survivors and mask-key shares of exactly the dropped sites"
            )
        index = roster.share_index(revealed.site)
        values = [
            *revealed.self_mask_shares.values(),
            *revealed.mask_key_shares.values(),
        ]
        if any(value.index != index for value in values):
            raise SecureAggregationError(
                f"site {revealed.site!r} revealed shares whose index is not its "
                f"own index {index}"
            )
        self._reveals[revealed.site] = revealed

    def unmask(self) -> UnmaskedSum:
        """Remove every mask from the survivors' sum and decode it.

        Raises:
            SecureAggregationError: fewer than ``threshold`` survivors revealed
                shares, or so many revealed shares are wrong that no
                ``threshold`` of them rebuild a secret matching its site's
                commitment or public key. Nothing is released in either case.
        """
        self._require(_Phase.REVEALING, "unmask")
        request = self._current_request()
        roster = self._current_roster()
        if len(self._reveals) < self.threshold:
            raise SecureAggregationError(
                f"only {len(self._reveals)} survivors revealed shares, fewer than "
                f"the threshold {self.threshold}; nothing is unmasked"
            )
        dtype = self.encoding.dtype
        total = np.zeros(self.vector_length, dtype=dtype)
        for site in request.survivors:
            total += self._masked[site]
        for site in request.survivors:
            seed = self._rebuild(
                site, "self_mask_shares", self._commitment_check(site, roster)
            )
            total -= self_mask(seed, self.vector_length, dtype)
        for dropped in request.dropped:
            total -= self._dropped_site_terms(dropped, request.survivors, roster)
        self._phase = _Phase.DONE
        weighted_sum = self.encoding.decode(from_ring(total))
        sample_count = sum(self._sample_counts[site] for site in request.survivors)
        logger.info(
            "round %s unmasked the sum of %s sites",
            self.context.round_number,
            len(request.survivors),
        )
        return UnmaskedSum(
            ring_sum=total,
            weighted_sum=weighted_sum,
            sample_count=sample_count,
            survivors=tuple(request.survivors),
        )

    def _dropped_site_terms(
        self, dropped: str, survivors: list[str], roster: KeyRoster
    ) -> np.ndarray:
        """Return the sum of the pairwise terms survivors added for ``dropped``."""
        advertised = decode_key(
            roster.advertisement(dropped).mask_public_key, field="mask_public_key"
        )

        def matches_public_key(raw_key: bytes) -> bool:
            candidate = X25519PrivateKey.from_private_bytes(raw_key)
            return public_key_bytes(candidate) == advertised

        raw_key = self._rebuild(dropped, "mask_key_shares", matches_public_key)
        private_key = X25519PrivateKey.from_private_bytes(raw_key)
        terms = np.zeros(self.vector_length, dtype=self.encoding.dtype)
        for survivor in survivors:
            survivor_public = decode_key(
                roster.advertisement(survivor).mask_public_key, field="mask_public_key"
            )
            terms += pairwise_mask(
                private_key,
                survivor_public,
                context=self.context,
                site=survivor,
                peer=dropped,
                length=self.vector_length,
                dtype=self.encoding.dtype,
            )
        return terms

    def export_state(self) -> dict[str, Any]:
        """Return the round state as JSON-compatible data, for persistence.

        The masked vectors are left out because the service already stores
        the envelopes they came in; pass them back to ``restore``. The state
        holds only what the service may see anyway: public keys, sealed
        shares, sample counts and revealed shares.
        """
        return {
            "format": _STATE_FORMAT,
            "study": self.context.study,
            "round": self.context.round_number,
            "threshold": self.threshold,
            "vector_length": self.vector_length,
            "phase": self._phase.name.lower(),
            "advertisements": [
                item.model_dump(mode="json") for item in self._advertisements.values()
            ],
            "share_uploads": [
                item.model_dump(mode="json") for item in self._share_uploads.values()
            ],
            "sample_counts": dict(self._sample_counts),
            "withdrawn": sorted(self._withdrawn),
            "reveals": [
                item.model_dump(mode="json") for item in self._reveals.values()
            ],
        }

    @classmethod
    def restore(
        cls,
        state: Mapping[str, Any],
        *,
        encoding: RingEncoding,
        masked_vectors: Mapping[str, np.ndarray],
        verify_keys: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> "MaskingServer":
        """Rebuild a round from ``export_state`` output and the stored vectors.

        Every message is checked again as it is replayed, so corrupted state
        raises instead of producing a wrong sum.

        Raises:
            SecureAggregationError: the state is malformed, inconsistent, or
                the masked vectors do not match the recorded uploads.
        """
        try:
            if state["format"] != _STATE_FORMAT:
                raise SecureAggregationError(
                    f"masking round state format {state['format']!r} is not "
                    f"{_STATE_FORMAT!r}"
                )
            phase = _Phase[str(state["phase"]).upper()]
            if phase is _Phase.DONE:
                raise SecureAggregationError(
                    "masking round state is from a round that was already unmasked"
                )
            server = cls(
                study=state["study"],
                round_number=state["round"],
                threshold=state["threshold"],
                encoding=encoding,
                vector_length=state["vector_length"],
                verify_keys=verify_keys,
            )
            sample_counts = dict(state["sample_counts"])
            for raw in state["advertisements"]:
                server.add_advertisement(parse_message(KeyAdvertisement, raw))
            withdrawn = list(state.get("withdrawn", []))
            # A site that withdrew while advertising has no advertisement
            # left, so replaying its withdrawal in a later phase would fail.
            left_before_roster = set(withdrawn) - set(server._advertisements)
            server._withdrawn.update(left_before_roster)
            if phase.value >= _Phase.SHARING.value:
                server.close_advertising()
            for raw in state["share_uploads"]:
                server.add_share_upload(parse_message(ShareUpload, raw))
            # Withdrawals replay in the share phase, which accepts every
            # roster site, before the upload phase, which accepts only sites
            # that shared keys.
            for site in withdrawn:
                server.withdraw(site)
            if phase.value >= _Phase.UPLOADING.value:
                server.close_sharing()
            if set(masked_vectors) != set(sample_counts):
                raise SecureAggregationError(
                    f"masked vectors are given for sites {sorted(masked_vectors)} "
                    f"but the state records uploads from {sorted(sample_counts)}"
                )
            for site, vector in masked_vectors.items():
                server.add_masked_update(site, vector, sample_count=sample_counts[site])
            if phase.value >= _Phase.REVEALING.value:
                server.close_uploads()
            for raw in state["reveals"]:
                server.add_reveal(parse_message(RevealedShares, raw))
        except (KeyError, TypeError, ValueError, ConfigError) as error:
            raise SecureAggregationError(
                f"masking round state is malformed: {error!r}"
            ) from None
        return server

    def _commitment_check(
        self, site: str, roster: KeyRoster
    ) -> Callable[[bytes], bool]:
        expected = roster.advertisement(site).self_mask_commitment

        def matches_commitment(seed: bytes) -> bool:
            commitment = self_mask_commitment(seed, context=self.context, site=site)
            return commitment == expected

        return matches_commitment

    def _rebuild(self, site: str, field: str, verify: Callable[[bytes], bool]) -> bytes:
        """Rebuild ``site``'s secret from the ``field`` shares all revealers sent.

        Wrong shares are tolerated as long as some ``threshold`` of the
        revealed shares rebuild a secret that passes ``verify``. The sites that
        revealed the wrong ones are logged.
        """
        shares = []
        revealer_by_index = {}
        for revealer, revealed in sorted(self._reveals.items()):
            value: ShareValue = getattr(revealed, field)[site]
            shares.append(Share.from_hex(value.index, value.value))
            revealer_by_index[value.index] = revealer
        secret_name = "self-mask seed" if field == "self_mask_shares" else "mask key"
        try:
            secret, wrong = rebuild_verified(
                shares, threshold=self.threshold, verify=verify
            )
        except SecureAggregationError as error:
            raise SecureAggregationError(
                f"could not rebuild the {secret_name} of site {site!r}: {error}"
            ) from None
        if wrong:
            logger.warning(
                "round %s: sites %s revealed wrong shares of the %s of site %s; "
                "they were ignored",
                self.context.round_number,
                sorted(revealer_by_index[index] for index in wrong),
                secret_name,
                site,
            )
        return secret

    def _current_roster(self) -> KeyRoster:
        if self._roster is None:
            raise RoundNotReadyError("the round's roster is not closed yet")
        return self._roster

    def _current_request(self) -> RevealRequest:
        if self._request is None:
            raise RoundNotReadyError("uploads are not closed yet")
        return self._request

    def _require(self, phase: _Phase, action: str) -> None:
        if self._phase is not phase:
            error_type = (
                RoundNotReadyError
                if self._phase.value < phase.value
                else SecureAggregationError
            )
            raise error_type(
                f"round {self.context.round_number} cannot {action} in phase "
                f"{self._phase.name.lower()}; expected phase {phase.name.lower()}"
            )
