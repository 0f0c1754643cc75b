"""Under systemd, the daemons' processes are systemd's: the broker asks it.

The broker started with `--systemd system|user` spawns nothing. To free memory
by stopping a daemon's process it runs `systemctl --no-block stop
modelhost-daemon@NAME.service`, and `start` to have it back; every heartbeat
it reads the units' states with `systemctl show` and hands them to the
scheduler as the supervisor's report, in the same words `modelhost up`'s
supervisor uses (running, starting, backoff, failed, stopped).

Every systemctl runs as a child process that the loop never waits for: its
output goes to a temporary file (a pipe could fill and stall it) and is read
once the process has exited. A system broker (user `modelhost`) needs the
polkit rule that `modelhost install-systemd` writes to start and stop the
daemon units.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

log = logging.getLogger("modelhost.broker")

PROPERTIES = ("Id", "ActiveState", "SubState", "MainPID", "NRestarts", "Result")
# A systemctl that has not answered in this long is killed and tried again.
SYSTEMCTL_TIMEOUT_S = 30.0


def unit_of(name: str) -> str:
    return "modelhost-daemon@{}.service".format(name)


@dataclass
class _Job:
    argv: list
    process: subprocess.Popen
    output: object  # the temporary file its stdout and stderr go to
    started: float = field(default_factory=time.monotonic)


class SystemdDaemons:
    def __init__(self, names: list[str], scope: str, systemctl: str = "systemctl"):
        self.names = list(names)
        self.scope = ["--user"] if scope == "user" else []
        self.base = [systemctl] + self.scope
        self.orders: list[_Job] = []  # start / stop requests not finished yet
        self.query: _Job | None = None  # the running `systemctl show`

    # --- orders ---------------------------------------------------------------

    def set_running(self, name: str, running: bool) -> None:
        """Ask systemd to start or stop the daemon's unit; the answer comes in `show`."""
        verb = "start" if running else "stop"
        log.info("daemon=%s asking systemd to %s %s", name, verb, unit_of(name))
        job = self._run(["--no-block", verb, unit_of(name)])
        if job is not None:
            self.orders.append(job)

    # --- polling, from the broker's heartbeat -------------------------------------

    def poll(self) -> dict | None:
        """Reap finished systemctl runs; the daemons' process report when one is new."""
        for job in list(self.orders):
            if self._finished(job):
                self.orders.remove(job)
                if job.process.returncode != 0:
                    log.error("%s failed (exit %d): %s; the broker cannot start or stop "
                              "daemons without it (a system broker needs the polkit rule "
                              "that `modelhost install-systemd` writes)", " ".join(job.argv),
                              job.process.returncode, _read(job) or "no output")
                else:
                    job.output.close()
        report = None
        if self.query is not None and self._finished(self.query):
            job, self.query = self.query, None
            if job.process.returncode == 0:
                report = self.parse(_read(job))
            else:
                log.warning("%s failed (exit %d): %s", " ".join(job.argv),
                            job.process.returncode, _read(job) or "no output")
        if self.query is None and self.names:
            self.query = self._run(["show", "--property=" + ",".join(PROPERTIES)]
                                   + [unit_of(name) for name in self.names])
        return report

    def close(self) -> None:
        for job in self.orders + ([self.query] if self.query else []):
            if job.process.poll() is None:
                job.process.kill()
                job.process.wait()
            job.output.close()

    # --- reading systemctl ------------------------------------------------------

    def parse(self, text: str) -> dict:
        """{name: {status, pid, restarts, error}} from `systemctl show` of the units."""
        by_unit = {unit_of(name): name for name in self.names}
        report = {}
        for block in text.strip().split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            name = by_unit.get(props.get("Id", ""))
            if name is None:
                continue
            active, sub = props.get("ActiveState"), props.get("SubState")
            if active == "active" or active == "reloading":
                status = "running"
            elif active == "activating" and sub == "auto-restart":
                status = "backoff"  # exited; systemd restarts it after RestartSec
            elif active == "activating":
                status = "starting"
            elif active == "failed":
                status = "failed"
            elif active == "deactivating":
                # Still alive: a word the scheduler does not act on, so queued
                # work waits for the outcome instead of failing as "stopped".
                status = "stopping"
            else:  # inactive, maintenance
                status = "stopped"
            pid = int(props.get("MainPID") or 0)
            result = props.get("Result")
            report[name] = {
                "status": status, "pid": pid or None,
                "restarts": int(props.get("NRestarts") or 0),
                "error": None if result in (None, "", "success") else
                "systemd: {} ({}); see journalctl {}".format(
                    result, active, " ".join(self.scope + ["-u", unit_of(name)])),
            }
        return report

    def _run(self, args: list[str]) -> _Job | None:
        argv = self.base + args
        output = tempfile.TemporaryFile()
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                       stderr=subprocess.STDOUT)
        except OSError as exc:
            output.close()
            log.error("cannot run %s: %s", " ".join(argv), exc)
            return None
        return _Job(argv, process, output)

    @staticmethod
    def _finished(job: _Job) -> bool:
        if job.process.poll() is not None:
            return True
        if time.monotonic() - job.started > SYSTEMCTL_TIMEOUT_S:
            log.error("%s did not answer in %.0fs; killed", " ".join(job.argv),
                      SYSTEMCTL_TIMEOUT_S)
            job.process.kill()
            job.process.wait()
            return True
        return False


def _read(job: _Job) -> str:
    job.output.seek(0)
    text = job.output.read().decode("utf-8", "replace").strip()
    job.output.close()
    return text
