"""Shared fixtures: real venvs on other interpreters, and a real `modelhost up` to test against.

The test venvs are built once with modelhost's own setup code into
.cache/test-venvs (ignored by git) and reused while nothing changed. The whole
run gets a private state dir (.cache/test-state) and runtime dir (a temp dir).
"""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import modelhost

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / "tests" / "engines"
VENV_CACHE = ROOT / ".cache" / "test-venvs"

# A shell without job control starts a background command (`bash tests/run &`) with
# SIGINT ignored, and every process a test starts would inherit that: the tests that
# stop a child with Ctrl-C (up, top, logs -f, the gateway, Ray nodes) would then wait
# in vain. Children get SIGINT as a terminal would deliver it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _own_dirs():
    """The state and runtime dirs a modelhost of the user's own would use here."""
    from modelhost import local
    from modelhost.broker.config import _default_state_dir

    return [Path(os.path.expanduser("~/.local/state/modelhost")), _default_state_dir(),
            Path(os.path.abspath(local.default_runtime_dir()))]


# A test run must never touch the user's own state (venvs, remembered footprints)
# or the runtime dir of a modelhost the user runs: every test, and every process
# one starts, gets private dirs from the environment, set here before any test
# module is imported. The state dir lives under .cache so that the default
# configuration's venv is built once, not per run; everything else in it is
# cleared at each start, so runs do not see each other's footprints.
OWN_DIRS = _own_dirs()
TEST_STATE_HOME = ROOT / ".cache" / "test-state"
TEST_STATE = TEST_STATE_HOME / "modelhost"
TEST_RUNTIME_HOME = Path(tempfile.mkdtemp(prefix="mh-xdg-", dir="/tmp"))  # short: ipc paths
TEST_RUNTIME = TEST_RUNTIME_HOME / "modelhost"
TEST_STATE.mkdir(parents=True, exist_ok=True)
for _entry in TEST_STATE.iterdir():
    if _entry.name == "venvs":
        continue
    if _entry.is_dir() and not _entry.is_symlink():
        shutil.rmtree(_entry)
    else:
        _entry.unlink()
# Shared-memory segments too: never in the user's /dev/shm.
os.environ.update(MODELHOST_STATE_DIR=str(TEST_STATE), XDG_STATE_HOME=str(TEST_STATE_HOME),
                  MODELHOST_RUNTIME_DIR=str(TEST_RUNTIME),
                  XDG_RUNTIME_DIR=str(TEST_RUNTIME_HOME),
                  MODELHOST_SHM_DIR=str(TEST_RUNTIME_HOME / "shm"))
os.environ.pop("MODELHOST_ENDPOINT", None)  # it would name the user's broker
atexit.register(shutil.rmtree, TEST_RUNTIME_HOME, ignore_errors=True)


def _tree(path):
    """{relative path: (mtime_ns, size)} of everything under path; {} when it is absent."""
    if not os.path.lexists(path):
        return {}
    info = os.lstat(path)
    found = {".": (info.st_mtime_ns, info.st_size)}
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(parent, name)
            try:
                info = os.lstat(full)
            except OSError:
                continue
            found[os.path.relpath(full, path)] = (info.st_mtime_ns, info.st_size)
    return found


@pytest.fixture(scope="session", autouse=True)
def own_dirs_untouched():
    """Fails the run when anything under the user's own state or runtime dir was
    created, changed or removed while it ran (a modelhost of the user's running
    meanwhile would do that too)."""
    before = {path: _tree(path) for path in OWN_DIRS}
    yield
    for path, old in before.items():
        new = _tree(path)
        changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
        assert not changed, "the tests touched {}: {}".format(path, ", ".join(changed[:20]))

# Two daemons on interpreters unlike the host's, with numpy majors unlike each other.
TEST_VENVS = {
    "py37": ("3.7", "numpy<2\n"),
    "py312": ("3.12", "numpy>=2\n"),
}


@pytest.fixture(scope="session")
def test_venvs():
    """{name: venv path}, built (or found up to date) by modelhost.broker.envs."""
    from modelhost.broker import envs
    from modelhost.broker.config import DaemonConfig

    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    venvs = {}
    for name, (python, requirements) in TEST_VENVS.items():
        req = VENV_CACHE / (name + "-requirements.txt")
        if not req.exists() or req.read_text() != requirements:
            req.write_text(requirements)
        daemon = DaemonConfig(name=name, engine="probe_engine:ProbeEngine", python=python,
                              venv=VENV_CACHE / name, requirements=req)
        result = envs.setup_daemon(daemon, log=lambda line: None)
        assert result.action in ("created", "updated", "unchanged"), result.message
        venvs[name] = VENV_CACHE / name
    return venvs


def daemon_yaml(name, venv=None, engine="probe_engine:ProbeEngine", **settings):
    """A daemon section running a test engine (the probe engine by default), in a venv or
    on the host interpreter."""
    lines = ["  {}:".format(name),
             "    engine: {}".format(engine),
             "    pythonpath: [{}]".format(ENGINES)]
    if venv is None:
        lines += ["    python: {}".format(sys.executable), "    venv: false"]
    else:
        lines += ["    python: {}".format(venv / "bin" / "python"), "    venv: {}".format(venv)]
    for key, value in settings.items():
        lines.append("    {}: {}".format(key, value))
    return "\n".join(lines) + "\n"


def drain(generator):
    """(chunks, return value) of an engine operation that is a generator."""
    chunks = []
    while True:
        try:
            chunks.append(next(generator))
        except StopIteration as stop:
            return chunks, stop.value


class Host(object):
    """A real `modelhost up` (supervisor, broker and daemons as processes) in a temp dir."""

    def __init__(self, daemons, broker_settings=None):
        # Short: ipc socket paths are limited to 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="mh-", dir="/tmp"))
        self.runtime = self.dir / "run"
        settings = {"runtime_dir": str(self.runtime), "state_dir": str(self.dir / "state"),
                    "heartbeat_s": 0.5, "liveness": 3, "client_liveness_s": 3.0,
                    "log_level": "debug",
                    # Every test broker serves metrics and the dashboard, on a
                    # port of its own: status()["broker"]["http"] names it.
                    "http": '"127.0.0.1:0"'}
        settings.update(broker_settings or {})
        text = "broker:\n" + "".join("  {}: {}\n".format(k, v) for k, v in settings.items())
        text += "daemons:\n" + "".join(daemons)
        self.config = self.dir / "config.yaml"
        self.config.write_text(text)
        self.endpoint = "ipc://{}/frontend.sock".format(self.runtime)
        self.log_path = self.dir / "up.log"
        self.process = None
        self._clients = []

    def start(self, *extra, setup=False):
        """setup: let `up` set up the daemons' venvs first (the tests' venvs are built already)."""
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modelhost.cli", "up", "--config", str(self.config)]
            + ([] if setup else ["--no-setup"]) + list(extra),
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def client(self, **options):
        client = modelhost.Client(self.endpoint, **options)
        self._clients.append(client)
        return client

    def ps(self):
        with modelhost.Client(self.endpoint) as client:
            return client.ps(timeout=5.0)

    def daemon(self, name):
        return next(d for d in self.ps()["daemons"] if d["name"] == name)

    def wait_for(self, predicate, timeout=60.0, what="the condition"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError("modelhost up exited with {}:\n{}".format(
                    self.process.returncode, self.log()))
            try:
                last = self.ps()
                if predicate(last):
                    return last
            except modelhost.ModelhostError as exc:
                last = exc
            time.sleep(0.1)
        raise AssertionError("timed out waiting for {}; last status: {}\n--- log ---\n{}".format(
            what, last, self.log()[-6000:]))

    def wait_ready(self, *names, timeout=60.0):
        def ready(status):
            states = {d["name"]: d["state"] for d in status["daemons"]}
            return all(states.get(name) in ("ready", "busy") for name in names)
        return self.wait_for(ready, timeout, "daemons {} to be ready".format(", ".join(names)))

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self):
        for client in self._clients:
            client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                raise AssertionError("modelhost up did not stop on SIGINT:\n" + self.log())
        if self.process is not None:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def make_host():
    hosts = []

    def make(daemons, broker_settings=None):
        host = Host(daemons, broker_settings)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.stop()


@pytest.fixture
def probe_host(make_host):
    """One probe daemon on the host interpreter, queue of 3: the common case."""
    host = make_host([daemon_yaml("probe", max_queue=3, max_payload="32MiB")]).start()
    host.wait_ready("probe")
    return host


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open("/proc/{}/stat".format(pid)) as handle:
            # The state follows the name, which may hold spaces and parentheses.
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
