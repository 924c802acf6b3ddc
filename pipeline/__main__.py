"""python -m pipeline: the command line (orchestration/cli.py), the same as the `agegender` command."""

import sys

from .orchestration.cli import main

if __name__ == "__main__":  # not when local.jobs' spawned processes import the main module again
    sys.exit(main())
