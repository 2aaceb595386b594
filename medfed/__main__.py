"""``python -m medfed`` runs the ``medfed`` command line."""

from medfed.cli import main

main()
