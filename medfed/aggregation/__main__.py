"""Run the aggregation service: ``python -m medfed.aggregation --state-dir DIR``."""

import argparse
import logging
from pathlib import Path

import uvicorn

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
    arguments = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(
        ServiceSettings(
            state_dir=arguments.state_dir, max_upload_bytes=arguments.max_upload_bytes
        )
    )
    uvicorn.run(app, host=arguments.host, port=arguments.port, log_level="warning")


if __name__ == "__main__":
    main()
