"""Build the encoder a site passes to ``encode_envelope`` from the study config."""

from pathlib import Path

from medfed.contract.codecs import Codec
from medfed.contract.codecs.config import CompressionConfig
from medfed.sites.error_feedback import ErrorFeedback

__all__ = ["build_update_encoder"]


def build_update_encoder(
    config: CompressionConfig, *, state_dir: Path
) -> Codec | ErrorFeedback:
    """Return the codec of ``config``, wrapped in error feedback when it applies.

    Error feedback wraps every codec but fp32 when ``config.error_feedback``
    is set. The caller passes the result to ``encode_envelope(codec=...)``
    and, for an ``ErrorFeedback``, calls ``commit()`` once the aggregation
    service accepted the upload.

    Args:
        config: the study's compression section.
        state_dir: the site's state directory, where the residual is kept.
    """
    codec = config.build_codec()
    if config.error_feedback and codec.name != "fp32":
        return ErrorFeedback(codec, state_dir=state_dir)
    return codec
