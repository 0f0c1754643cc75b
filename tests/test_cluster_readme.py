"""The README's "Try it on one machine" block of its cluster section, run as written: two Ray
nodes on this host, `modelhost cluster up` on the embedded default, speech through the router
and back to text, then everything stopped.

The block ends with `ray stop`, which stops every Ray of this user on the machine, so the test
skips where another Ray runs (its own processes are the only ones it may stop)."""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Past one machine: a Ray cluster"


def readme_block():
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    after = section[section.index("Try it on one machine"):]
    return re.search(r"```bash\n(.*?)```", after, re.S).group(1)


def ray_running(wait_s=0.0):
    """Whether a Ray runs here; waiting up to wait_s for one that is stopping (the tests'
    own clusters exit within seconds of their stop)."""
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(["ps", "-eo", "comm="], capture_output=True, text=True)
        if not any(name.strip() in ("raylet", "gcs_server") for name in out.stdout.splitlines()):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.5)


def test_the_block_is_there_and_stops_what_it_starts():
    block = readme_block()
    assert block.count("ray start") == 2 and "modelhost cluster up" in block
    assert block.rstrip().endswith("ray stop")


def test_the_readme_cluster_block_runs_as_written(tmp_path):
    pytest.importorskip("ray")
    if ray_running(wait_s=30.0):
        pytest.skip("another Ray runs on this machine; the block's `ray stop` would stop it")
    block = readme_block()
    runtime = Path(tempfile.mkdtemp(prefix="mh-", dir="/tmp"))
    bin_dir = str(Path(sys.executable).parent)  # modelhost and ray of this interpreter
    env = dict(os.environ, MODELHOST_RUNTIME_DIR=str(runtime), RAY_USAGE_STATS_ENABLED="0",
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("MODELHOST_ENDPOINT", None)
    # The harness around the block: stop at the first failing command, and on the way out
    # (however it went) stop the background router.
    script = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + block
    try:
        out = subprocess.run(["bash", "-c", script], cwd=str(tmp_path), env=env,
                             capture_output=True, text=True, timeout=900)
    finally:
        if ray_running():  # the block failed before its own `ray stop`
            subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-10000:]
    assert re.search(r"^\S+\s+up\s.*espeak", out.stdout, re.M), out.stdout
    assert re.search(r"^\S+\s+up\s.*asr", out.stdout, re.M), out.stdout
    assert "node_a" in out.stdout and "node_b" in out.stdout
    assert "of speech at 22050 Hz" in out.stdout
    assert (tmp_path / "hello.wav").stat().st_size > 22050  # over half a second of audio
    lines = out.stdout.splitlines()
    said = next(index for index, line in enumerate(lines) if "of speech at 22050 Hz" in line)
    transcript = lines[said + 1].strip()  # what `modelhost transcribe` heard in it
    assert transcript and transcript.replace(" ", "").isalpha(), out.stdout
    assert not ray_running(wait_s=30.0)
