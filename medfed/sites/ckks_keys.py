"""A site's CKKS secret context: where it is kept and how it is loaded.

Every site of a study with ``secure_aggregation: ckks`` keeps the same
secret context, and the aggregation service never receives it. In deployment mode
``medfed provision`` writes it into each site's startup kit
(``KitFiles.CKKS_SECRET_CONTEXT``), and a site whose ``MEDFED_KIT_DIR`` is
set reads it from there. In local mode the coordinator generates it once per
study with ``ensure_local_secret_contexts`` and writes one copy into each
site's state folder, which the local aggregation service is never given.
The file is written with mode 0600 and its content is never logged.
"""

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from medfed.contract.config import StudyConfig
from medfed.contract.kits import KitFiles
from medfed.contract.secagg.ckks import CkksSiteContext
from medfed.errors import ConfigError

__all__ = [
    "ensure_local_secret_contexts",
    "load_secret_context",
    "write_secret_file",
]

logger = logging.getLogger(__name__)


def load_secret_context(
    config: StudyConfig, study_dir: Path, kit_dir: Path | None
) -> CkksSiteContext:
    """Load the site's secret context from its kit, or else from ``study_dir``.

    Raises:
        ConfigError: the file is missing. The message names the path and how
            to create the file.
        SecureAggregationError: the file is not a secret context for the
            study's encryption parameters.
    """
    if kit_dir is not None:
        path = kit_dir / KitFiles.CKKS_SECRET_CONTEXT
        remedy = (
            "provision the study's kits again with medfed provision, from a config "
            "with secure_aggregation: ckks"
        )
    else:
        path = study_dir / KitFiles.CKKS_SECRET_CONTEXT
        remedy = "medfed run creates it in local mode before the first round"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"CKKS secret context {str(path)!r} not found; {remedy}"
        ) from None
    return CkksSiteContext.from_bytes(data, config.secure_aggregation.ckks_parameters())


def ensure_local_secret_contexts(
    config: StudyConfig, study_dirs: Sequence[Path]
) -> None:
    """Give every site folder of a local study the same secret context.

    Generates a context when no site has one, and copies the existing one to
    sites that lack it (a site folder added on resume).

    Raises:
        ConfigError: two sites already hold different contexts.
    """
    paths = [directory / KitFiles.CKKS_SECRET_CONTEXT for directory in study_dirs]
    existing = {path: path.read_bytes() for path in paths if path.exists()}
    if len(set(existing.values())) > 1:
        raise ConfigError(
            "the sites of study "
            f"{config.study!r} hold different CKKS secret contexts in "
            f"{', '.join(str(path) for path in sorted(existing))}; delete them "
            "all to generate a new shared one"
        )
    if existing:
        data = next(iter(existing.values()))
    else:
        parameters = config.secure_aggregation.ckks_parameters()
        data = CkksSiteContext.create(parameters).secret_bytes()
        logger.info(
            "generated the CKKS secret context of study %s for %d sites",
            config.study,
            len(paths),
        )
    for path in paths:
        if path not in existing:
            write_secret_file(path, data)


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; never overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)
