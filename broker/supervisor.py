"""The supervisor behind `modelhost up`: the broker and every daemon as its children.

- each child runs in its own process group, so a stop can SIGKILL everything
  a daemon started (ffmpeg, compiler workers) and a Ctrl-C in the terminal
  reaches only the supervisor, which then stops the children in order;
- a child that dies is started again after an exponential backoff with a cap;
  the backoff resets once a child has stayed up for `reset_after_s`;
- every child is told the supervisor's pid and exits when it is gone, so no
  orphan keeps GPU memory;
- children's output is relayed line by line with their name, and the last
  lines are kept to explain a failed start; each child's lines (and the
  supervisor's own lines about it) are also appended to
  <runtime_dir>/logs/<name>.log for `modelhost logs`, rotated to
  <name>.log.1 past LOG_MAX_BYTES;
- the supervisor tells the broker what it knows of the processes (pid,
  restarts, start failures) and learns from the broker which daemons are
  ready, over an ordinary client connection;
- with a `gateway:` section, the OpenAI-compatible gateway is a child too
  (`python -m modelhost.gateway`), a client of the broker like any other: it
  is ready once it has written its address file, and one that cannot start
  at all (a taken port, a missing extra) is not restarted in a loop.

Its length (about 600 lines): process start, backoff, output relay and the log
files are one child's lifecycle, kept together so that a stop or a restart is read
in one place.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from modelhost import protocol
from modelhost.errors import ModelhostError

from .config import Config, DaemonConfig, RestartPolicy, daemon_spec, gateway_spec
from .curve import secure_link
from .envs import FINGERPRINT_FILE, interpreter_for

log = logging.getLogger("modelhost.supervisor")

TICK_S = 0.25
BROKER = "broker"
GATEWAY = "gateway"
# The broker's exit status when it cannot start at all (python -m modelhost.broker);
# the gateway's too (python -m modelhost.gateway).
EXIT_CANNOT_START = 2
# A child's log file moves to <name>.log.1 (replacing the older one) rather
# than grow past this, so two files bound what a child keeps on disk.
LOG_MAX_BYTES = 8 * 2**20
# After a failed write to a log file (a full disk), the next try is this much later.
LOG_RETRY_S = 30.0
LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s supervisor %(message)s"


class ProcessStatus(enum.Enum):
    PENDING = "pending"  # waits for the broker to answer before its first start
    STARTING = "starting"  # running, not yet reported ready by the broker
    RUNNING = "running"  # running and ready (or failed to load, which is final until reloaded)
    BACKOFF = "backoff"  # exited; waiting out the backoff before the next start
    FAILED = "failed"  # exited before it ever became ready; will be retried after backoff
    # (or its venv is not set up: never started, see Child.setup_error)
    STOPPED = "stopped"  # stopped on purpose


class LogFile:
    """<dir>/<name>.log: what a child printed, rotated to <name>.log.1 past LOG_MAX_BYTES.

    A write never raises and never stops the relay: a failure (a full disk)
    costs one warning, then writing is tried again every LOG_RETRY_S.
    """

    def __init__(self, name: str, directory: os.PathLike):
        self.name = name
        self.path = os.path.join(os.fspath(directory), name + ".log")
        self.fd: int | None = None
        self.size = 0
        self.failed_at: float | None = None  # None while writes succeed

    def write(self, data: bytes) -> None:
        if not data:
            return
        now = time.monotonic()
        if self.failed_at is not None and now - self.failed_at < LOG_RETRY_S:
            return
        try:
            if self.fd is None:
                self._open()
            if self.size and self.size + len(data) > LOG_MAX_BYTES:
                self.close()
                os.replace(self.path, self.path + ".1")
                self._open()
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                self.size += written
                view = view[written:]
        except OSError as exc:
            self.close()
            first = self.failed_at is None
            self.failed_at = now  # before logging: that line comes back here
            if first:
                log.warning("daemon=%s cannot write its log file %s (%s); its output is still "
                            "relayed here", self.name, self.path, exc)
            return
        if self.failed_at is not None:
            self.failed_at = None
            log.info("daemon=%s writing its log file %s again", self.name, self.path)

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                          0o600)
        self.size = os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


class ChildLogHandler(logging.Handler):
    """Copies the supervisor's lines about a child (`daemon=NAME ...`) into its log file."""

    def __init__(self, children: dict):
        super().__init__()
        self.children = children
        self.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%dT%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if not message.startswith("daemon="):
                return
            child = self.children.get(message[len("daemon="):].split(" ", 1)[0])
            if child is not None and child.log_file is not None:
                child.log_file.write((self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)


@dataclass(eq=False)
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restart: RestartPolicy
    ready_timeout_s: float
    stop_timeout_s: float
    status: ProcessStatus = ProcessStatus.STOPPED
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    next_start_at: float = 0.0
    restarts: int = 0
    crashes_in_a_row: int = 0  # drives the backoff; reset after a stable run
    ever_ready: bool = False  # whether this run of the process became ready
    exited_pid: int | None = None  # its last process, once that exited
    exit_how: str = ""  # and how it ended
    error: str | None = None
    # Stopped because the broker's memory manager asked (the "stopped" tier):
    # not restarted until the broker wants it back.
    held_down: bool = False
    # Its venv's setup failed (or never finished): started, it could only crash-loop
    # (`No module named 'modelhost'`), so it is never started; `ps` shows this error.
    setup_error: str | None = None
    stop_deadline: float | None = None  # when a held-down child that lingers is killed
    tail: deque = field(default_factory=lambda: deque(maxlen=40))
    partial_line: bytes = b""
    log_file: LogFile | None = None

    def report(self) -> dict:
        return {"status": self.status.value, "pid": self.process.pid if self.process else None,
                # Which process a "failed" is about: the broker knows whether it was ready.
                "exited_pid": None if self.process else self.exited_pid,
                "restarts": self.restarts, "error": self.error,
                # Never started again by itself (its venv setup failed): a load cannot help.
                "final": self.setup_error is not None}


def _venv_problem(daemon: DaemonConfig) -> str | None:
    """Why the daemon's venv cannot run it: setup writes its fingerprint file last,
    after the install succeeded, so without it the last setup failed or never ran
    (`modelhost up --no-setup`)."""
    if daemon.venv is None or (daemon.venv / FINGERPRINT_FILE).is_file():
        return None
    return ("not started: its venv {} is not set up (the last `modelhost setup {}` failed or "
            "never ran)".format(daemon.venv, daemon.name))


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return "killed by {}".format(signal.Signals(-code).name)
        except ValueError:
            return "killed by signal {}".format(-code)
    return "exited with code {}".format(code)


class Supervisor:
    def __init__(self, config: Config, *, output=None, setup_failed: dict[str, str] | None = None):
        """setup_failed: daemon name -> why its venv's setup failed (the setup's last lines)."""
        self.config = config
        self.output = output or sys.stderr.buffer
        self.selector = selectors.DefaultSelector()
        self.children: dict[str, Child] = {}
        self.stopping = False
        self.exit_code = 0
        self.announced_up = False
        self.context = zmq.Context()
        self.link = None  # DEALER to the broker's frontend
        self.link_sent_at = 0.0
        self.link_seq = 0
        self.states: dict[str, dict] = {}  # daemon name -> last `ps` row from the broker
        # Proves to the broker that a process report comes from its supervisor;
        # handed to the broker in its environment, never to the daemons.
        self.token = secrets.token_hex(16)
        runtime = config.broker.runtime_dir
        os.makedirs(runtime / "daemons", mode=0o700, exist_ok=True)
        config_arg = ["--config", str(config.path)] if config.path else []
        self.children[BROKER] = Child(
            BROKER, [sys.executable, "-m", "modelhost.broker", *config_arg,
                     "--parent-pid", str(os.getpid())],
            dict(os.environ, MODELHOST_SUPERVISOR_TOKEN=self.token),
            RestartPolicy(backoff_s=0.5, max_backoff_s=10.0),
            ready_timeout_s=30.0, stop_timeout_s=5.0)
        # The children that are not daemons: never reported to the broker as daemons,
        # never held down for memory. (A daemon may be named "gateway" when there is no
        # gateway section; the configuration refuses the name when there is one.)
        self.helpers = {BROKER}
        self.gateway_address = runtime / "gateway-address.json"
        if config.gateway is not None:
            self.children[GATEWAY] = self._gateway_child()
            self.helpers.add(GATEWAY)
        for name, daemon in config.daemons.items():
            if daemon.autostart:
                child = self.children[name] = self._daemon_child(daemon)
                child.setup_error = (setup_failed or {}).get(name) or _venv_problem(daemon)
                if child.setup_error is not None:
                    child.status, child.error = ProcessStatus.FAILED, child.setup_error
                    child.next_start_at = math.inf  # no restarts either
        for child in self.children.values():
            child.log_file = LogFile(child.name, runtime / "logs")

    def _daemon_child(self, daemon: DaemonConfig) -> Child:
        spec_path = self.config.broker.runtime_dir / "daemons" / (daemon.name + ".json")
        spec = daemon_spec(self.config, daemon.name, parent_pid=os.getpid())
        spec_path.write_text(json.dumps(spec, indent=2))
        env = dict(os.environ, PYTHONUNBUFFERED="1", **daemon.env)
        # The host's virtual env must not leak into the daemon's interpreter.
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return Child(daemon.name,
                     [str(interpreter_for(daemon)), "-m", "modelhost.daemons.run", daemon.name,
                      "--spec", str(spec_path)],
                     env, daemon.restart, daemon.ready_timeout_s, daemon.stop_timeout_s)

    def _gateway_child(self) -> Child:
        runtime = self.config.broker.runtime_dir
        spec = gateway_spec(self.config, address_file=str(self.gateway_address),
                            parent_pid=os.getpid())
        spec_path = runtime / "gateway.json"
        # Owner-only: the spec holds the API keys.
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(spec, indent=2))
        return Child(GATEWAY, [sys.executable, "-m", "modelhost.gateway", "--spec", str(spec_path)],
                     dict(os.environ, PYTHONUNBUFFERED="1"),
                     RestartPolicy(backoff_s=1.0, max_backoff_s=30.0),
                     ready_timeout_s=30.0, stop_timeout_s=5.0)

    def _note_gateway(self) -> None:
        """A starting gateway is ready once its address file names its pid."""
        child = self.children.get(GATEWAY)
        if GATEWAY not in self.helpers or child is None or child.process is None \
                or child.status is not ProcessStatus.STARTING:
            return
        try:
            address = json.loads(self.gateway_address.read_text())
        except (OSError, ValueError):
            return
        if address.get("pid") == child.process.pid:
            child.status = ProcessStatus.RUNNING
            child.ever_ready = True
            child.error = None
            log.info("daemon=%s ready after %.1fs: OpenAI-compatible API at %s/v1", GATEWAY,
                     time.monotonic() - child.started_at, address.get("url"))

    # --- processes ----------------------------------------------------------

    def start(self, child: Child) -> None:
        if child.setup_error is not None:
            return  # every way to start a child comes here: it stays failed, with no process
        if child.name == GATEWAY and GATEWAY in self.helpers:
            try:
                self.gateway_address.unlink()  # a stale one would say "ready" too early
            except OSError:
                pass
        child.exited_pid = None
        try:
            child.process = subprocess.Popen(
                child.argv, env=child.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            child.process = None
            child.error = "cannot start {}: {}".format(child.argv[0], exc)
            log.error("daemon=%s %s", child.name, child.error)
            self._schedule_restart(child, failed=True)
            return
        os.set_blocking(child.process.stdout.fileno(), False)
        self.selector.register(child.process.stdout, selectors.EVENT_READ, child)
        child.status = ProcessStatus.STARTING
        child.started_at = time.monotonic()
        child.ever_ready = False
        log.info("daemon=%s started: pid %d: %s", child.name, child.process.pid,
                 " ".join(child.argv))

    def _relay(self, child: Child) -> None:
        stream = child.process.stdout if child.process else None
        if stream is None:
            return
        try:
            data = stream.read()
        except (OSError, ValueError):
            data = b""
        if not data:
            return
        lines = (child.partial_line + data).split(b"\n")
        child.partial_line = lines.pop()
        if lines:
            self._emit(child, lines)

    def _emit(self, child: Child, lines: list[bytes]) -> None:
        for line in lines:
            child.tail.append(line.decode("utf-8", "replace"))
        block = b"".join(line + b"\n" for line in lines)
        self.output.write(block)
        self.output.flush()
        if child.log_file is not None:
            child.log_file.write(block)

    def _reap(self, child: Child) -> None:
        if child.process is None or child.process.poll() is None:
            return
        self._relay(child)
        if child.partial_line:
            self._emit(child, [child.partial_line])
            child.partial_line = b""
        self.selector.unregister(child.process.stdout)
        child.process.stdout.close()
        code = child.process.returncode
        how = describe_exit(code)
        child.exited_pid, child.exit_how = child.process.pid, how
        child.process = None
        if self.stopping or child.held_down:
            child.status = ProcessStatus.STOPPED
            child.stop_deadline = None
            if child.held_down:
                log.info("daemon=%s stopped to free memory (%s)", child.name, how)
            return
        if child.name == BROKER and code == EXIT_CANNOT_START:
            # A bad configuration or a taken endpoint: restarting cannot help.
            log.error("daemon=%s cannot start (see above); stopping", BROKER)
            child.status = ProcessStatus.STOPPED
            self.stopping = True
            self.exit_code = EXIT_CANNOT_START
            return
        if child.name == GATEWAY and GATEWAY in self.helpers and code == EXIT_CANNOT_START:
            # A taken port or a missing extra: the broker and the daemons serve on.
            child.error = "cannot start: {}".format("\n".join(list(child.tail)[-5:]) or how)
            child.status = ProcessStatus.FAILED
            child.next_start_at = math.inf
            log.error("daemon=%s cannot start (see above); not restarted: fix it, then restart "
                      "`modelhost up`", GATEWAY)
            return
        if not child.ever_ready:
            child.error = "{} before it became ready; its last output:\n{}".format(
                how, "\n".join(list(child.tail)[-15:]) or "(none)")
            log.error("daemon=%s failed to start: %s", child.name, child.error)
            self._schedule_restart(child, failed=True)
        else:
            child.error = how
            log.error("daemon=%s %s", child.name, how)
            self._schedule_restart(child, failed=False)

    def _schedule_restart(self, child: Child, *, failed: bool) -> None:
        now = time.monotonic()
        if child.started_at and now - child.started_at >= child.restart.reset_after_s:
            child.crashes_in_a_row = 0
        child.crashes_in_a_row += 1
        delay = min(child.restart.backoff_s * 2 ** (child.crashes_in_a_row - 1),
                    child.restart.max_backoff_s)
        child.status = ProcessStatus.FAILED if failed else ProcessStatus.BACKOFF
        child.next_start_at = now + delay
        log.info("daemon=%s restarting in %.1fs", child.name, delay)

    def _kill_group(self, child: Child, signum: int) -> None:
        if child.process is not None:
            try:
                os.killpg(child.process.pid, signum)
            except ProcessLookupError:
                pass

    # --- the broker link ----------------------------------------------------

    def _talk_to_broker(self) -> None:
        if self.link is None:
            self.link = self.context.socket(zmq.DEALER)
            self.link.setsockopt(zmq.LINGER, 0)
            self.link.setsockopt(zmq.SNDHWM, 4)
            secure_link(self.link, self.config.broker)
            self.link.connect(self.config.broker.frontend)
        while True:
            try:
                frames = self.link.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                header, _ = protocol.decode(frames)
            except ModelhostError as exc:
                log.warning("unreadable reply from the broker: %s", exc)
                continue
            if header.get("kind") == protocol.RESULT:
                self.states = {row["name"]: row for row in header["value"]["daemons"]}
                self._hold_down(set(header["value"].get("stop") or ()))
                broker = self.children[BROKER]
                if broker.process is not None and broker.status is ProcessStatus.STARTING:
                    broker.status = ProcessStatus.RUNNING
                    broker.ever_ready = True
                for child in self.children.values():
                    if child.status is ProcessStatus.PENDING:
                        self.start(child)
                self._note_readiness()
        now = time.monotonic()
        if now - self.link_sent_at >= 0.5:
            self.link_seq += 1
            processes = {name: child.report() for name, child in self.children.items()
                         if name not in self.helpers}
            try:
                self.link.send_multipart(protocol.supervisor_message(
                    self.link_seq, processes, self.token), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the broker is restarting; the next tick tries again
            self.link_sent_at = now

    def _hold_down(self, wanted_stopped: set[str]) -> None:
        """Stop the daemons the broker stopped to free memory; start them when it wants them."""
        now = time.monotonic()
        for name, child in self.children.items():
            if name in self.helpers or child.setup_error is not None:
                continue  # a daemon never started stays `failed`, not `stopped`
            if name in wanted_stopped and not child.held_down:
                child.held_down = True
                if child.process is not None:
                    log.info("daemon=%s stopping: the broker needs its memory", name)
                    self._kill_group(child, signal.SIGTERM)
                    child.stop_deadline = now + child.stop_timeout_s
                else:
                    child.status = ProcessStatus.STOPPED
            elif name not in wanted_stopped and child.held_down:
                child.held_down = False
                if child.process is None:
                    log.info("daemon=%s starting again: the broker has room for it", name)
                    child.crashes_in_a_row = 0
                    self.start(child)

    def _note_readiness(self) -> None:
        for name, row in self.states.items():
            child = self.children.get(name)
            if child is None or name in self.helpers:
                continue
            # Ready: registered, and past the load the broker ordered when
            # it came up (if it had room for one); a hung first load is
            # caught by ready_timeout_s like a hung start. The broker keeps
            # the pids that got there, so a process ready only between two
            # replies is known to have been ready even after it died.
            ready_pids = row.get("ready_pids") or ()
            if child.process is None:
                if child.status is ProcessStatus.FAILED and child.exited_pid in ready_pids:
                    child.status = ProcessStatus.BACKOFF
                    child.error = child.exit_how
                    log.info("daemon=%s had become ready (the broker says) before it ended (%s):"
                             " a crash, not a failed start", name, child.exit_how)
                continue
            state = row.get("state")
            if child.process.pid in ready_pids:
                if child.status is ProcessStatus.STARTING:
                    child.status = ProcessStatus.RUNNING
                    child.ever_ready = True
                    child.error = None
                    if state == protocol.DaemonState.FAILED:
                        log.error("daemon=%s is up but its engine failed: %s", name,
                                  row.get("last_error"))
                    else:
                        log.info("daemon=%s ready after %.1fs", name,
                                 time.monotonic() - child.started_at)
        # A daemon whose venv setup failed never starts: it does not hold up the rest.
        daemons = [c for n, c in self.children.items()
                   if n not in self.helpers and c.setup_error is None]
        if not self.announced_up and all(c.status is ProcessStatus.RUNNING for c in daemons):
            self.announced_up = True
            broken = [n for n, c in self.children.items()
                      if n not in self.helpers and c.setup_error is not None]
            log.info("modelhost is up: %d daemons (%s)%s; clients connect at %s", len(daemons),
                     ", ".join(c.name for c in daemons) or "none",
                     "; not started, their setup failed: " + ", ".join(broken) if broken else "",
                     self.config.broker.frontend)

    # --- the loop -----------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            self._reap(child)
            if child.process is None and not child.held_down and child.status in (
                    ProcessStatus.BACKOFF, ProcessStatus.FAILED) and now >= child.next_start_at:
                child.restarts += 1
                self.start(child)
            elif child.held_down and child.process is not None and child.stop_deadline \
                    and now > child.stop_deadline:
                log.warning("daemon=%s did not stop within %.0fs; killing its process group",
                            child.name, child.stop_timeout_s)
                self._kill_group(child, signal.SIGKILL)
                child.stop_deadline = None
            elif (child.status is ProcessStatus.STARTING and child.name != BROKER
                  and now - child.started_at > child.ready_timeout_s):
                log.error("daemon=%s not ready after %.0fs (ready_timeout_s); killing it. Its "
                          "last output:\n%s", child.name, child.ready_timeout_s,
                          "\n".join(list(child.tail)[-15:]) or "(none)")
                self._kill_group(child, signal.SIGKILL)
        self._note_gateway()
        self._talk_to_broker()

    def run(self) -> int:
        handler = ChildLogHandler(self.children)
        log.addHandler(handler)
        try:
            return self._run()
        finally:
            log.removeHandler(handler)
            for child in self.children.values():
                if child.log_file is not None:
                    child.log_file.close()

    def _run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: setattr(self, "stopping", True))
        # Daemons start once the broker answers: a broker that cannot start
        # (a taken endpoint) must not leave daemons talking to another one.
        self.start(self.children[BROKER])
        for name, child in self.children.items():
            if name != BROKER and child.setup_error is None:
                child.status = ProcessStatus.PENDING
            elif name != BROKER:
                log.error("daemon=%s %s", name, child.setup_error)  # also for `modelhost logs`
        while not self.stopping:
            for key, _ in self.selector.select(TICK_S):
                self._relay(key.data)
            self.tick()
        self.stop()
        return self.exit_code

    def stop(self) -> None:
        """Daemons first (SIGTERM, then SIGKILL of the group), the broker last."""
        self.stopping = True
        order = [c for n, c in self.children.items() if n != BROKER] + [self.children[BROKER]]
        for group in (order[:-1], order[-1:]):
            for child in group:
                self._kill_group(child, signal.SIGTERM)
            deadline = time.monotonic() + max((c.stop_timeout_s for c in group), default=0)
            while any(c.process is not None for c in group) and time.monotonic() < deadline:
                for key, _ in self.selector.select(0.05):
                    self._relay(key.data)
                for child in group:
                    self._reap(child)
            for child in group:
                if child.process is not None:
                    log.warning("daemon=%s did not stop within %.0fs; killing its process group",
                                child.name, child.stop_timeout_s)
                    self._kill_group(child, signal.SIGKILL)
                    child.process.wait()
                    self._reap(child)
        self.context.destroy(linger=0)
        log.info("all stopped")
