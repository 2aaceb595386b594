"""One exception root for medfed, with typed subclasses.

The CLI maps each subclass to an exit code and prints its message on one line,
so every message must state what is wrong, on which value, and what to do.
"""

__all__ = [
    "AggregationError",
    "AuditLogError",
    "BudgetExceededError",
    "ConfigError",
    "DataError",
    "DeployError",
    "EnvelopeError",
    "LedgerError",
    "MedfedError",
    "QuorumError",
    "SecureAggregationError",
    "ServiceError",
    "SignatureError",
    "SiteRunError",
    "StateRollbackError",
]


class MedfedError(Exception):
    """Root of every error medfed raises on purpose."""

    exit_code = 1


class ConfigError(MedfedError, ValueError):
    """A study config or a parameter is invalid."""

    exit_code = 2


class DataError(MedfedError, ValueError):
    """A dataset is missing, unreadable or does not match its checksum."""

    exit_code = 3


class EnvelopeError(MedfedError, ValueError):
    """An update envelope is malformed, oversized or inconsistent."""

    exit_code = 4


class SignatureError(EnvelopeError):
    """An envelope's signature is missing, unknown or does not verify."""


class BudgetExceededError(MedfedError):
    """A site's next round would spend more privacy than its budget allows."""

    exit_code = 5


class LedgerError(MedfedError):
    """A site's privacy ledger is unreadable, invalid or disagrees with its study.

    The site does not train until the ledger is restored, because it cannot
    tell how much of its budget it has spent.
    """

    exit_code = 5


class ServiceError(MedfedError):
    """The aggregation service rejected a request or could not be reached."""

    exit_code = 6

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AggregationError(MedfedError):
    """A round could not be aggregated."""

    exit_code = 7


class QuorumError(AggregationError):
    """Fewer sites uploaded than the round's quorum requires."""

    exit_code = 8


class SecureAggregationError(AggregationError):
    """A secure-aggregation round cannot go on without risking a site's update.

    Raised, before anything is released, when too few sites remain to unmask,
    when a protocol message is inconsistent with the round, or when a
    reconstructed secret does not match what its site committed to.
    """

    exit_code = 10


class AuditLogError(MedfedError):
    """The audit log cannot be read or appended, or its hash chain is broken."""

    exit_code = 9


class DeployError(MedfedError):
    """Building images or starting containers for a deployment failed."""

    exit_code = 11


class SiteRunError(MedfedError):
    """A site's flow run in deployment mode failed or missed its deadline."""

    exit_code = 12


class StateRollbackError(MedfedError):
    """The aggregation service has fewer model versions than the study released.

    Its state was restored from an older backup or replaced. Resuming would
    train and release the lost versions again, and the privacy they spent
    would no longer be counted wherever the sites' ledgers went back too.
    """

    exit_code = 13
