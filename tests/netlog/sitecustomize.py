"""Put on PYTHONPATH with NETLOG=FILE (tests/test_kaggle.py): every socket connect of the process (an audit event)
is appended to FILE as host:port, so that a test can check that none left loopback."""

import os
import sys

_LOG = os.environ.get("NETLOG")


def _log_connect(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple):
        with open(_LOG, "a") as f:
            f.write(f"{args[1][0]}:{args[1][1]}\n")


if _LOG:
    sys.addaudithook(_log_connect)
