"""Validation of study and site identifiers.

Identifiers name directories, database keys, Prefect work pools and MLflow
tags, so they are checked against one strict pattern before any use. The
pattern admits no path separator, no dot-dot and no leading dash.
"""

import re

from medfed.errors import ConfigError

__all__ = ["IDENTIFIER_PATTERN", "validate_identifier"]

IDENTIFIER_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def validate_identifier(value: object, *, kind: str) -> str:
    """Return ``value`` when it is a valid identifier, else raise ConfigError.

    Args:
        value: the candidate identifier.
        kind: what the identifier names ("site", "study"), used in the message.
    """
    if not isinstance(value, str) or not IDENTIFIER_PATTERN.fullmatch(value):
        raise ConfigError(
            f"invalid {kind} identifier {value!r}: use 1 to 63 characters of "
            "lower-case letters, digits, '-' or '_', starting with a letter"
        )
    return value
