"""Tell the flow when a masking round no longer needs the sites still running.

The service drops a site that misses a key-exchange deadline from the
round's masking round, and the other sites upload and reveal without it.
``MaskingRoundWatch`` reads the round's status while the flow waits for the
site tasks, so the flow can finalize then instead of at the round deadline.
"""

import logging
from typing import Any

from medfed.errors import ServiceError
from medfed.sites.client import AggregationClient

__all__ = ["MaskingRoundWatch"]

logger = logging.getLogger(__name__)


class MaskingRoundWatch:
    """A ``done`` check for ``_gather`` over the site tasks of one masking round.

    Calling it with the sites whose tasks still run returns True once the
    masking round can finish without them. That is when the round was
    aborted, or when uploads closed (phase ``revealing``) and none of those
    sites uploaded, so every site that uploaded has returned, which a site
    does after it revealed its shares.
    """

    def __init__(
        self, client: AggregationClient, study: str, round_number: int
    ) -> None:
        self.client = client
        self.study = study
        self.round_number = round_number
        #: The ``masking`` part of the last round status read, or None.
        self.progress: dict[str, Any] | None = None
        self._poll_errors = 0

    def __call__(self, pending: set[str]) -> bool:
        try:
            status = self.client.round_status(self.study, self.round_number)
        except ServiceError as error:
            # The wait goes on until the round deadline, as without polls.
            self._poll_errors += 1
            if self._poll_errors == 1:
                logger.warning(
                    "could not read the status of masking round %d of study %s; "
                    "waiting for its sites until the round deadline unless a later "
                    "read succeeds (further errors are not logged): %s",
                    self.round_number, self.study, error,
                )  # fmt: skip
            return False
        progress = status.get("masking")
        if progress is None:
            return False
        self.progress = progress
        if progress["phase"] == "aborted":
            return True
        if progress["phase"] != "revealing":
            return False
        return not pending.intersection(progress["uploaded"])

    def drop_reason(self, site: str) -> str:
        """Return why the masking round went on without ``site``, as one line."""
        progress = self.progress or {}
        if progress.get("phase") == "aborted":
            return (
                f"dropped because masking round {self.round_number} was aborted "
                f"while the site still ran: {progress['reason']}"
            )
        if site in progress.get("withdrew", []):
            step = "it withdrew"
        elif site not in progress.get("advertised", []):
            step = "it did not advertise its keys before advertising closed"
        elif site not in progress.get("shared", []):
            step = "it did not share its keys before sharing closed"
        else:
            step = "it did not upload its masked update before uploads closed"
        return (
            f"dropped by masking round {self.round_number}: {step}, and the other "
            f"sites revealed their shares without it"
        )
