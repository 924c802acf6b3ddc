"""python -m pipeline: the command line (orchestration/cli.py)."""

import sys

from .orchestration.cli import main

sys.exit(main(sys.argv[1:]))
