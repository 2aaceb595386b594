"""Run the aggregation service: ``python -m medfed.aggregation --state-dir DIR``."""

import argparse
import logging
from pathlib import Path

import uvicorn

from medfed.aggregation.limits import ServiceLimits
from medfed.aggregation.service import ServiceSettings, create_app


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the medfed aggregation service.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8765, help="TCP port to listen on")
    parser.add_argument(
        "--state-dir", type=Path, required=True, help="folder for the SQLite state"
    )
    parser.add_argument(
        "--max-upload-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="largest request body accepted, in bytes",
    )
    parser.add_argument(
        "--kit-dir",
        type=Path,
        default=None,
        help="the service's startup kit from medfed provision; enables mutual TLS, "
        "signature checks and a signed audit head (default: local mode, plain HTTP)",
    )
    parser.add_argument(
        "--rate-per-second",
        type=float,
        default=ServiceLimits().rate_per_second,
        help="sustained requests per second allowed per site",
    )
    parser.add_argument(
        "--rate-burst",
        type=int,
        default=ServiceLimits().rate_burst,
        help="requests a site may send at once after being idle",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=ServiceLimits().max_concurrency,
        help="concurrent connections and tasks before the service answers 503",
    )
    arguments = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    limits = ServiceLimits(
        rate_per_second=arguments.rate_per_second,
        rate_burst=arguments.rate_burst,
        max_concurrency=arguments.max_concurrency,
    )
    app = create_app(
        ServiceSettings(
            state_dir=arguments.state_dir,
            max_upload_bytes=arguments.max_upload_bytes,
            kit_dir=arguments.kit_dir,
            service_limits=limits,
        )
    )
    uvicorn.run(
        app,
        host=arguments.host,
        port=arguments.port,
        log_level="warning",
        **app.state.security.uvicorn_options(),
    )


if __name__ == "__main__":
    main()
