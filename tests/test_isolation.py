"""The test run keeps off the user's own modelhost state and runtime dirs (conftest.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import OWN_DIRS, TEST_RUNTIME_HOME, TEST_STATE_HOME

from modelhost import local
from modelhost.broker.config import _default_state_dir, load_config

PRIVATE = (TEST_STATE_HOME, TEST_RUNTIME_HOME)


def _private(path):
    path = Path(os.path.abspath(path))
    return any(path == root or root in path.parents for root in PRIVATE)


def test_the_default_dirs_are_private_here_and_in_child_processes():
    assert all(not _private(own) for own in OWN_DIRS)
    for var in ("MODELHOST_STATE_DIR", "XDG_STATE_HOME", "MODELHOST_RUNTIME_DIR",
                "XDG_RUNTIME_DIR"):
        assert _private(os.environ[var]), var
    assert "MODELHOST_ENDPOINT" not in os.environ
    default = load_config()  # the embedded default: `modelhost up` with no --config
    seen = [_default_state_dir(), local.default_runtime_dir(), local.default_endpoint()[6:],
            default.broker.state_dir, default.broker.runtime_dir,
            default.daemons["espeak"].venv]
    # What a process a test starts (`modelhost up`, `modelhost setup`) resolves.
    code = ("import json; from modelhost import local; "
            "from modelhost.broker.config import _default_state_dir as s; "
            "print(json.dumps([str(s()), local.default_runtime_dir()]))")
    seen += json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                      text=True, check=True).stdout)
    assert all(_private(path) for path in seen), seen
