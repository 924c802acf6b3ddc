"""python -m pipeline: the command line (orchestration/cli.py), the same as the `agegender` command."""

import sys

from .orchestration.cli import main

sys.exit(main())
