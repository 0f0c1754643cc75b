"""An engine for the chaos test: each run of `work` is written down, per process.

Every call appends `start TAG TIME PID` when it begins and `finish TAG TIME PID` just
before it returns, to LOG_DIR/<pid>.log. One os.write per line on an O_APPEND file:
a line is whole or absent, and what was written survives a SIGKILL of the process a
moment later (it is in the kernel already). TIME is time.monotonic(), which on Linux
is one clock for every process of the machine, so the test can set it against the
moments it killed processes.

Runs on Python 3.7 with only the stdlib and modelhost.
"""

import os
import time

from modelhost.daemons.engine import Engine, operation


class ChaosEngine(Engine):
    def __init__(self, log_dir, **options):
        super(ChaosEngine, self).__init__(**options)
        self.log_dir = log_dir
        self._log = None

    def _record(self, event, tag):
        if self._log is None:
            self._log = os.open(os.path.join(self.log_dir, "{}.log".format(os.getpid())),
                                os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        line = "{} {} {:.6f} {}\n".format(event, tag, time.monotonic(), os.getpid())
        os.write(self._log, line.encode())

    @operation
    def work(self, ctx, tag: str, seconds: float = 0.05):
        """Take `seconds` (cancellable), then return the tag and who ran it."""
        self._record("start", tag)
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            ctx.check_cancelled()
            time.sleep(min(0.01, left))
        self._record("finish", tag)
        return {"tag": tag, "pid": os.getpid()}
