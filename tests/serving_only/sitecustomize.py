"""Put on PYTHONPATH, Python imports this at start-up (and so does every process spawned from it): importing any
package named in BLOCKED_PACKAGES raises ImportError, as on a machine that has only requirements-serve.txt."""

import os
import sys

BLOCKED = {name for name in os.environ.get("BLOCKED_PACKAGES", "").split(",") if name}


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (not in requirements-serve.txt)", name=name)
        return None


sys.meta_path.insert(0, Blocked())
