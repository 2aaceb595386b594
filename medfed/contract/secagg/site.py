"""A site's side of a masking round (double masking with dropouts).

Call the methods in protocol order, once each:

1. ``advertise`` returns the site's public keys and self-mask commitment.
2. ``share_keys(roster)`` splits the self-mask seed and the mask private key
   t-of-n and encrypts each pair of shares to its recipient.
3. ``receive_shares(shares)`` decrypts the shares the service relayed; their
   senders are the peers whose pairwise masks this site adds.
4. ``mask_update`` (floats) or ``mask_vector`` (ring elements) returns the
   masked vector to upload.
5. ``reveal(request)`` returns the self-mask shares of survivors and the
   mask-key shares of dropped sites, never both for one site.

Every check that fails raises ``SecureAggregationError`` and changes no state,
so a site that rejects a message reveals nothing.
"""

import base64
import binascii
import logging
import secrets
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medfed.contract.ids import validate_identifier
from medfed.contract.secagg.keys import (
    RoundContext,
    SiteKeyPairs,
    decode_key,
    derive_pairwise_secret,
    encode_key,
    private_key_bytes,
    public_key_bytes,
    self_mask_commitment,
)
from medfed.contract.secagg.layout import VectorLayout
from medfed.contract.secagg.masks import pairwise_mask, self_mask
from medfed.contract.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    KeyRoster,
    RevealedShares,
    RevealRequest,
    SharePlaintext,
    ShareUpload,
    ShareValue,
    parse_message,
)
from medfed.contract.secagg.prg import SEED_BYTES
from medfed.contract.secagg.ring import RingEncoding, to_ring
from medfed.contract.secagg.shamir import Share, split_secret
from medfed.contract.secagg.signing import sign_advertisement, verify_advertisement
from medfed.errors import SecureAggregationError

__all__ = ["SHARE_ENCRYPTION_PURPOSE", "MaskingSite", "share_associated_data"]

logger = logging.getLogger(__name__)

SHARE_ENCRYPTION_PURPOSE = "share-encryption"
_TAMPERING_HINT = (
    "the aggregation service may be tampering with the sites' public keys "
    "(a man in the middle)"
)
_NONCE_BYTES = 12


class _Phase(Enum):
    ADVERTISE = 1
    SHARE = 2
    RECEIVE = 3
    MASK = 4
    REVEAL = 5
    DONE = 6


def share_associated_data(context: RoundContext, sender: str, recipient: str) -> bytes:
    """Return the AES-GCM associated data that binds a share to its round and pair."""
    return context.to_bytes() + f"\x00{sender}\x00{recipient}".encode()


class MaskingSite:
    """One site's keys, secrets and state for one masking round.

    Args:
        site: this site's id.
        study: the study id.
        round_number: the round; every derived key is bound to it.
        encoding: the round's ring encoding (fixed point or int8 levels), the
            same at every site.
        signing_key: this site's Ed25519 key; when set, advertisements are
            signed.
        peer_verify_keys: the Ed25519 verify key of every site of the study.
            When set, the site rejects a roster with an advertisement that is
            unsigned, signed with another key or for another round, or from a
            site not listed, and shares no keys.
        minimum_threshold: the study's configured Shamir threshold; the
            site rejects a roster with a lower one, which would let fewer
            colluding parties open its shares. None accepts any threshold
            that the roster's own check allows (more than half its sites).
    """

    def __init__(
        self,
        *,
        site: str,
        study: str,
        round_number: int,
        encoding: RingEncoding,
        signing_key: Ed25519PrivateKey | None = None,
        peer_verify_keys: Mapping[str, Ed25519PublicKey] | None = None,
        minimum_threshold: int | None = None,
    ) -> None:
        self.site = validate_identifier(site, kind="site")
        self.context = RoundContext(
            validate_identifier(study, kind="study"), round_number
        )
        self.encoding = encoding
        self._signing_key = signing_key
        self._peer_verify_keys = peer_verify_keys
        self._minimum_threshold = minimum_threshold
        self._keys = SiteKeyPairs.generate()
        self._self_mask_seed = secrets.token_bytes(SEED_BYTES)
        self._phase = _Phase.ADVERTISE
        self._roster: KeyRoster | None = None
        self._received: dict[str, SharePlaintext] = {}

    def advertise(self) -> KeyAdvertisement:
        """Return this site's public keys and its self-mask commitment."""
        self._require(_Phase.ADVERTISE, "advertise")
        self._phase = _Phase.SHARE
        return self._advertisement()

    def share_keys(
        self, roster: KeyRoster | str | bytes | dict[str, Any]
    ) -> ShareUpload:
        """Split this site's secrets over ``roster`` and encrypt each share.

        Raises:
            SecureAggregationError: the roster is for another round, omits or
                alters this site's advertisement, has an advertisement that
                fails the signature check (with ``peer_verify_keys``), or has
                more sites than the encoding allows.
        """
        self._require(_Phase.SHARE, "share keys")
        if not isinstance(roster, KeyRoster):
            roster = parse_message(KeyRoster, roster)
        self._check_roster(roster)
        site_count = len(roster.sites)
        self_mask_shares = split_secret(
            self._self_mask_seed, threshold=roster.threshold, share_count=site_count
        )
        mask_key_shares = split_secret(
            private_key_bytes(self._keys.mask_key),
            threshold=roster.threshold,
            share_count=site_count,
        )
        sealed = []
        for position, recipient in enumerate(roster.sites):
            plaintext = SharePlaintext(
                sender=self.site,
                recipient=recipient,
                self_mask_share=_share_value(self_mask_shares[position]),
                mask_key_share=_share_value(mask_key_shares[position]),
            )
            if recipient == self.site:
                own_share = plaintext
            else:
                sealed.append(self._seal(plaintext, roster.advertisement(recipient)))
        self._roster = roster
        self._received = {self.site: own_share}
        self._phase = _Phase.RECEIVE
        logger.info(
            "site %s split its secrets %s-of-%s for round %s",
            self.site,
            roster.threshold,
            site_count,
            self.context.round_number,
        )
        return ShareUpload(sender=self.site, shares=sealed)

    def receive_shares(self, shares: Sequence[EncryptedShare]) -> None:
        """Decrypt the shares relayed to this site; their senders become its peers.

        Raises:
            SecureAggregationError: a share is addressed to another site, comes
                from outside the roster or twice, fails authentication, or
                fewer than ``threshold`` sites (this one included) sent shares.
        """
        self._require(_Phase.RECEIVE, "receive shares")
        roster = self._current_roster()
        own_index = roster.share_index(self.site)
        received: dict[str, SharePlaintext] = {}
        for share in shares:
            if share.recipient != self.site:
                raise SecureAggregationError(
                    f"share from {share.sender!r} is addressed to "
                    f"{share.recipient!r}, not to site {self.site!r}"
                )
            if share.sender == self.site or share.sender not in roster.sites:
                raise SecureAggregationError(
                    f"share sender {share.sender!r} is not a peer in the round's roster"
                )
            if share.sender in received:
                raise SecureAggregationError(
                    f"received two shares from site {share.sender!r}"
                )
            plaintext = self._open(share, roster.advertisement(share.sender))
            for value in (plaintext.self_mask_share, plaintext.mask_key_share):
                if value.index != own_index:
                    raise SecureAggregationError(
                        f"share from {share.sender!r} has index {value.index}, "
                        f"expected this site's index {own_index}"
                    )
            received[share.sender] = plaintext
        if len(received) + 1 < roster.threshold:
            raise SecureAggregationError(
                f"only {len(received) + 1} sites sent shares, fewer than the "
                f"threshold {roster.threshold}; the round cannot be unmasked"
            )
        self._received.update(received)
        self._phase = _Phase.MASK

    @property
    def peers(self) -> list[str]:
        """The other sites whose shares this site received, sorted."""
        return sorted(site for site in self._received if site != self.site)

    def mask_vector(self, vector: np.ndarray) -> np.ndarray:
        """Return ``vector`` (ring elements) plus the self mask and pairwise masks.

        Raises:
            SecureAggregationError: the vector is not 1-D or not of the ring's
                dtype.
        """
        self._require(_Phase.MASK, "mask an update")
        dtype = self.encoding.dtype
        array = np.asarray(vector)
        if array.ndim != 1 or array.dtype != dtype:
            raise SecureAggregationError(
                f"vector to mask must be 1-D {dtype}, got shape "
                f"{list(array.shape)} and dtype {array.dtype}"
            )
        roster = self._current_roster()
        masked = array + self_mask(self._self_mask_seed, array.size, dtype)
        for peer in self.peers:
            peer_public = decode_key(
                roster.advertisement(peer).mask_public_key, field="mask_public_key"
            )
            masked += pairwise_mask(
                self._keys.mask_key,
                peer_public,
                context=self.context,
                site=self.site,
                peer=peer,
                length=array.size,
                dtype=dtype,
            )
        self._phase = _Phase.REVEAL
        return masked

    def mask_update(
        self,
        update: Mapping[str, np.ndarray],
        *,
        sample_count: int,
        rng: np.random.Generator | None = None,
    ) -> dict[str, np.ndarray]:
        """Encode ``update`` weighted by ``sample_count`` and mask it.

        Returns:
            The masked ring elements split into ``update``'s tensors (sorted
            names), ready for an envelope with the ``masked`` codec.
        """
        layout = VectorLayout.of(update)
        integers = self.encoding.encode(
            layout.flatten(update), weight=sample_count, rng=rng
        )
        masked = self.mask_vector(to_ring(integers, self.encoding.ring_bits))
        return layout.split(masked)

    def reveal(
        self, request: RevealRequest | str | bytes | dict[str, Any]
    ) -> RevealedShares:
        """Return the shares the service needs to unmask the survivors' sum.

        Raises:
            SecureAggregationError: the request is for another round, does not
                list this site as a survivor, lists a site both ways or outside
                this site's peers, or has fewer survivors than the threshold.
        """
        self._require(_Phase.REVEAL, "reveal shares")
        if not isinstance(request, RevealRequest):
            request = parse_message(RevealRequest, request)
        self._check_reveal_request(request)
        revealed = RevealedShares(
            site=self.site,
            self_mask_shares={
                site: self._received[site].self_mask_share for site in request.survivors
            },
            mask_key_shares={
                site: self._received[site].mask_key_share for site in request.dropped
            },
        )
        self._phase = _Phase.DONE
        logger.info(
            "site %s revealed shares for %s survivors and %s dropped sites",
            self.site,
            len(request.survivors),
            len(request.dropped),
        )
        return revealed

    def _advertisement(self) -> KeyAdvertisement:
        advertisement = KeyAdvertisement(
            site=self.site,
            mask_public_key=encode_key(public_key_bytes(self._keys.mask_key)),
            share_public_key=encode_key(public_key_bytes(self._keys.share_key)),
            self_mask_commitment=self_mask_commitment(
                self._self_mask_seed, context=self.context, site=self.site
            ),
        )
        if self._signing_key is None:
            return advertisement
        # Ed25519 signatures are deterministic, so the advertisement rebuilt
        # for the roster check equals the one sent.
        return sign_advertisement(advertisement, self._signing_key, self.context)

    def _check_roster(self, roster: KeyRoster) -> None:
        if (roster.study, roster.round) != (
            self.context.study,
            self.context.round_number,
        ):
            raise SecureAggregationError(
                f"roster is for study {roster.study!r} round {roster.round}, not "
                f"{self.context.study!r} round {self.context.round_number}"
            )
        if self.site not in roster.sites:
            raise SecureAggregationError(f"roster does not list site {self.site!r}")
        if (
            self._minimum_threshold is not None
            and roster.threshold < self._minimum_threshold
        ):
            raise SecureAggregationError(
                f"site {self.site!r} rejected the roster of round "
                f"{self.context.round_number} and shares no keys: it sets "
                f"threshold {roster.threshold}, below the study's threshold "
                f"{self._minimum_threshold}; the aggregation service may have "
                "lowered it"
            )
        if roster.advertisement(self.site) != self._advertisement():
            raise SecureAggregationError(
                f"roster carries keys for site {self.site!r} that are not its own; "
                f"{_TAMPERING_HINT}"
            )
        if self._peer_verify_keys is not None:
            self._verify_roster_signatures(roster)
        if len(roster.sites) > self.encoding.site_count:
            raise SecureAggregationError(
                f"roster lists {len(roster.sites)} sites but the encoding is sized "
                f"for at most {self.encoding.site_count}; the sum could wrap around"
            )

    def _verify_roster_signatures(self, roster: KeyRoster) -> None:
        """Check every advertisement's signature against its site's verify key.

        Only public keys, site ids and the round appear in the error, so a
        caller may log it.
        """
        assert self._peer_verify_keys is not None
        for advertisement in roster.advertisements:
            verify_key = self._peer_verify_keys.get(advertisement.site)
            try:
                if verify_key is None:
                    raise SecureAggregationError(
                        f"roster lists site {advertisement.site!r}, which has no "
                        "verify key in this site's registry"
                    )
                verify_advertisement(advertisement, verify_key, self.context)
            except SecureAggregationError as error:
                raise SecureAggregationError(
                    f"site {self.site!r} rejected the roster of round "
                    f"{self.context.round_number} and shares no keys: {error}; "
                    f"{_TAMPERING_HINT}"
                ) from None

    def _check_reveal_request(self, request: RevealRequest) -> None:
        roster = self._current_roster()
        if (request.study, request.round) != (
            self.context.study,
            self.context.round_number,
        ):
            raise SecureAggregationError(
                f"reveal request is for study {request.study!r} round "
                f"{request.round}, not {self.context.study!r} round "
                f"{self.context.round_number}"
            )
        survivors = set(request.survivors)
        dropped = set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(
            request.dropped
        ):
            raise SecureAggregationError("reveal request lists a site twice")
        if self.site not in survivors:
            raise SecureAggregationError(
                f"reveal request does not list site {self.site!r} as a survivor"
            )
        both = sorted(survivors & dropped)
        if both:
            raise SecureAggregationError(
                f"reveal request lists sites {both} as both survivors and dropped; "
                "revealing both shares of a site would expose its update"
            )
        if survivors | dropped != set(self._received):
            raise SecureAggregationError(
                "reveal request survivors and dropped sites must together be the "
                f"sites that shared keys {sorted(self._received)}"
            )
        if len(survivors) < roster.threshold:
            raise SecureAggregationError(
                f"reveal request lists {len(survivors)} survivors, fewer than the "
                f"threshold {roster.threshold}; no shares are revealed"
            )

    def _seal(
        self, plaintext: SharePlaintext, recipient: KeyAdvertisement
    ) -> EncryptedShare:
        key = self._share_key(recipient)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = AESGCM(key).encrypt(
            nonce,
            plaintext.model_dump_json().encode(),
            share_associated_data(self.context, self.site, recipient.site),
        )
        return EncryptedShare(
            sender=self.site,
            recipient=recipient.site,
            nonce=base64.b64encode(nonce).decode("ascii"),
            ciphertext=base64.b64encode(ciphertext).decode("ascii"),
        )

    def _open(self, share: EncryptedShare, sender: KeyAdvertisement) -> SharePlaintext:
        key = self._share_key(sender)
        try:
            nonce = base64.b64decode(share.nonce, validate=True)
            ciphertext = base64.b64decode(share.ciphertext, validate=True)
            raw = AESGCM(key).decrypt(
                nonce,
                ciphertext,
                share_associated_data(self.context, sender.site, self.site),
            )
        except (binascii.Error, ValueError, InvalidTag):
            raise SecureAggregationError(
                f"share from site {sender.site!r} failed decryption: it was "
                "altered or not sealed for this site and round"
            ) from None
        plaintext = parse_message(SharePlaintext, raw)
        if (plaintext.sender, plaintext.recipient) != (sender.site, self.site):
            raise SecureAggregationError(
                f"share from site {sender.site!r} names sender "
                f"{plaintext.sender!r} and recipient {plaintext.recipient!r}"
            )
        return plaintext

    def _share_key(self, peer: KeyAdvertisement) -> bytes:
        return derive_pairwise_secret(
            self._keys.share_key,
            decode_key(peer.share_public_key, field="share_public_key"),
            purpose=SHARE_ENCRYPTION_PURPOSE,
            context=self.context,
            site=self.site,
            peer=peer.site,
        )

    def _current_roster(self) -> KeyRoster:
        if self._roster is None:
            raise SecureAggregationError("the round's roster has not been received")
        return self._roster

    def _require(self, phase: _Phase, action: str) -> None:
        if self._phase is not phase:
            raise SecureAggregationError(
                f"site {self.site!r} cannot {action} in phase "
                f"{self._phase.name.lower()}; expected phase {phase.name.lower()}"
            )


def _share_value(share: Share) -> ShareValue:
    return ShareValue(index=share.index, value=share.value_hex())
