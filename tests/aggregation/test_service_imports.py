"""The aggregation image installs no torch, Opacus, Prefect, MLflow or MONAI,
so the service must start without importing them."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

#: Packages that the aggregation image (images/requirements/aggregation.txt)
#: leaves out.
NOT_IN_AGGREGATION_IMAGE = ("torch", "opacus", "prefect", "mlflow", "monai")

_IMPORT_SERVICE = """
import sys
import medfed.cli
from medfed.aggregation.service import ServiceSettings, create_app
print(",".join(name for name in sys.argv[1:] if name in sys.modules))
"""


def test_service_imports_no_training_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_SERVICE, *NOT_IN_AGGREGATION_IMAGE],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
