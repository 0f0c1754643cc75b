"""What the benchmarks share: a real `modelhost up` to measure, and percentiles."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def die_with_parent():
    """Have the kernel SIGTERM this process when the bench dies, even by SIGKILL."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class UpHost(object):
    """`modelhost up` from a generated config in `directory`, stopped with SIGINT.

    `broker_lines` are extra lines of the broker section; `daemons` the
    daemon sections, as YAML text.
    """

    def __init__(self, directory, broker_lines, daemons):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        runtime = self.dir / "run"
        self.endpoint = "ipc://{}/frontend.sock".format(runtime)
        config = ("broker:\n"
                  "  runtime_dir: {}\n"
                  "  state_dir: {}\n"
                  "  log_level: info\n").format(json.dumps(str(runtime)),
                                                json.dumps(str(self.dir / "state")))
        config += "".join("  {}\n".format(line) for line in broker_lines)
        self.config = self.dir / "config.yaml"
        self.config.write_text(config + "daemons:\n" + "".join(daemons))
        self.log_path = self.dir / "up.log"
        self.process = None
        self._log = None
        self.started_at = None
        self.env = None  # the environment of `modelhost up` (None: this process's)

    def start(self):
        self._log = open(str(self.log_path), "wb")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modelhost.cli", "up", "--config", str(self.config),
             "--no-setup"], env=self.env,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            # Its own session, so a Ctrl-C meant for the bench reaches it only
            # through stop(); SIGTERM (a clean stop) should the bench die outright.
            start_new_session=True, preexec_fn=die_with_parent)

    def log_tail(self, chars=4000):
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                print("warning: modelhost up did not stop within 30s of SIGINT; killing its "
                      "process group", file=sys.stderr)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
