"""Logs: journal priorities, the supervisor's per-child log files, `modelhost logs [-f]`."""

import logging
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from io import BytesIO

import pytest

import modelhost
from conftest import daemon_yaml
from modelhost import _logs
from modelhost.broker import supervisor
from modelhost.broker.config import parse_config

# Logs through configure_logging: every level, a multi-line message, a traceback.
LOGGING_SCRIPT = r'''
import logging
from modelhost import local

local.configure_logging("daemon=tts", "debug")
log = logging.getLogger("modelhost.daemon")
log.debug("rid=r1 debugging")
log.info("rid=r2 informing")
log.warning("rid=r3 warning")
log.error("rid=r4 failing")
log.critical("rid=r5 critical")
log.info("rid=r6 first line\nsecond line")
try:
    raise ValueError("bad value")
except ValueError:
    log.exception("rid=r7 tts raised")
'''

PRIORITIES = {"r1": "7", "r2": "6", "r3": "4", "r4": "3", "r5": "2"}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def journal_env(fd):
    st = os.fstat(fd)
    return dict(os.environ, JOURNAL_STREAM="{}:{}".format(st.st_dev, st.st_ino))


def run_logging(python, stderr, env):
    subprocess.run([str(python), "-c", LOGGING_SCRIPT], stderr=stderr, env=env, check=True,
                   timeout=60)


def check_journal_lines(lines):
    assert lines, "nothing was logged"
    for line in lines:
        assert re.match(r"<[2-7]>", line), line
        assert not TIMESTAMP.search(line), line
    by_rid = {re.search(r"rid=(r\d)", line).group(1): line for line in lines if "rid=" in line}
    for rid, priority in PRIORITIES.items():
        level = {"7": "DEBUG", "6": "INFO", "4": "WARNING", "3": "ERROR", "2": "CRITICAL"}[priority]
        assert by_rid[rid].startswith("<{}>{} daemon=tts rid={} ".format(priority, level, rid))
    # A message's second line keeps its priority, instead of becoming a line of its own.
    assert "<6>second line" in lines
    # Every line of a traceback is an error, down to the exception itself.
    start = lines.index("<3>ERROR daemon=tts rid=r7 tts raised")
    traceback = lines[start + 1:]
    assert traceback[0] == "<3>Traceback (most recent call last):"
    assert traceback[-1] == "<3>ValueError: bad value"
    assert all(line.startswith("<3>") for line in traceback)


def test_under_the_journal_each_line_carries_its_priority_and_no_time(tmp_path):
    path = tmp_path / "stderr"
    with open(path, "wb") as stderr:
        run_logging(sys.executable, stderr, journal_env(stderr.fileno()))
    check_journal_lines(path.read_text().splitlines())


def test_journal_detected_on_a_pipe(tmp_path):
    read_end, write_end = os.pipe()
    env = journal_env(write_end)
    process = subprocess.Popen([sys.executable, "-c", LOGGING_SCRIPT], stderr=write_end,
                               env=env)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        text = reader.read().decode()
    assert process.wait(60) == 0
    check_journal_lines(text.splitlines())


@pytest.mark.slow
def test_journal_format_on_python_37(tmp_path, test_venvs):
    path = tmp_path / "stderr"
    with open(path, "wb") as stderr:
        run_logging(test_venvs["py37"] / "bin" / "python", stderr,
                    journal_env(stderr.fileno()))
    check_journal_lines(path.read_text().splitlines())


@pytest.mark.parametrize("journal", ["other", "malformed", None])
def test_not_the_journal_keeps_the_time_and_no_priority(tmp_path, journal):
    path = tmp_path / "stderr"
    other = tmp_path / "other"
    other.write_text("")
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    if journal == "other":
        # What a child of a journal-connected process inherits with its stderr redirected.
        st = os.stat(other)
        env["JOURNAL_STREAM"] = "{}:{}".format(st.st_dev, st.st_ino)
    elif journal == "malformed":
        env["JOURNAL_STREAM"] = "nonsense"
    with open(path, "wb") as stderr:
        run_logging(sys.executable, stderr, env)
    lines = path.read_text().splitlines()
    informing = next(line for line in lines if "rid=r2" in line)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} INFO daemon=tts rid=r2 informing$",
                    informing), informing
    assert not any(line.startswith("<") for line in lines)


# --- the supervisor's log files --------------------------------------------------


def test_log_file_rotates_past_the_limit_and_keeps_one_old_file(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "LOG_MAX_BYTES", 1000)
    log_file = supervisor.LogFile("tts", tmp_path / "logs")
    lines = ["line {:04d} {}\n".format(i, "x" * 40).encode() for i in range(200)]
    for line in lines:
        log_file.write(line)
    log_file.close()
    current = tmp_path / "logs" / "tts.log"
    old = tmp_path / "logs" / "tts.log.1"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["tts.log", "tts.log.1"]
    assert 0 < current.stat().st_size <= 1000 and 900 < old.stat().st_size <= 1000
    # The two files hold the newest lines, in order, each once.
    kept = old.read_bytes() + current.read_bytes()
    assert kept == b"".join(lines[-len(kept.splitlines()):])
    assert stat.S_IMODE(current.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700
    # And `modelhost logs` reads across both.
    files = _logs.open_logs(str(current))
    try:
        assert _logs.last_lines(files, 25) == b"".join(lines[-25:])
    finally:
        for handle, _ in files:
            handle.close()


def test_log_file_appends_to_what_an_earlier_run_wrote(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "LOG_MAX_BYTES", 100)
    (tmp_path / "tts.log").write_bytes(b"a" * 79 + b"\n")
    log_file = supervisor.LogFile("tts", tmp_path)
    log_file.write(b"b" * 9 + b"\n")
    log_file.write(b"c" * 19 + b"\n")  # 110 bytes: rotates first
    log_file.close()
    assert (tmp_path / "tts.log.1").read_bytes() == b"a" * 79 + b"\n" + b"b" * 9 + b"\n"
    assert (tmp_path / "tts.log").read_bytes() == b"c" * 19 + b"\n"


def test_a_full_disk_costs_one_warning_and_writing_resumes(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(supervisor, "LOG_RETRY_S", 0.0)
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    path = tmp_path / "tts.log"
    path.symlink_to("/dev/full")
    log_file = supervisor.LogFile("tts", tmp_path)
    with caplog.at_level(logging.INFO, logger="modelhost.supervisor"):
        for _ in range(5):
            log_file.write(b"lost\n")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "daemon=tts cannot write its log file" in warnings[0]
        assert "No space left" in warnings[0]
        path.unlink()
        log_file.write(b"kept\n")
    log_file.close()
    assert path.read_bytes() == b"kept\n"
    assert any("writing its log file" in r.getMessage() and "again" in r.getMessage()
               for r in caplog.records)


def test_the_supervisor_keeps_relaying_when_a_log_file_cannot_be_written(tmp_path):
    config = parse_config("broker:\n  runtime_dir: {}\n  state_dir: {}\ndaemons:\n{}".format(
        tmp_path / "run", tmp_path / "state", daemon_yaml("probe")), tmp_path / "c.yaml")
    output = BytesIO()
    host = supervisor.Supervisor(config, output=output)
    try:
        assert set(host.children) == {"broker", "probe"}
        (tmp_path / "run" / "logs").mkdir()
        (tmp_path / "run" / "logs" / "probe.log").symlink_to("/dev/full")
        host._emit(host.children["probe"], [b"one", b"two"])
        host._emit(host.children["broker"], [b"three"])
        assert output.getvalue() == b"one\ntwo\nthree\n"
        assert list(host.children["probe"].tail) == ["one", "two"]
        assert (tmp_path / "run" / "logs" / "broker.log").read_bytes() == b"three\n"
    finally:
        for child in host.children.values():
            child.log_file.close()
        host.context.destroy(linger=0)


def wait_for_text(path, text, host, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return path.read_text(errors="replace")
        time.sleep(0.1)
    raise AssertionError("{!r} never appeared in {}; it has:\n{}\n--- up ---\n{}".format(
        text, path, path.read_text(errors="replace") if path.exists() else "(none)",
        host.log()[-4000:]))


class Follower(object):
    """`modelhost logs ... -f` as a process, its stdout read by a thread."""

    def __init__(self, argv, env=None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modelhost.cli", "logs"] + argv, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env)
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, predicate, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.process.kill()
                raise AssertionError("the follower never printed the line; it printed:\n{}\n"
                                     "stderr: {}".format("\n".join(self.seen),
                                                         self.process.stderr.read().decode()))
            self.seen.append(line)
            if predicate(line):
                return line

    def stop(self):
        """Ctrl-C; the exit status."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.mark.slow
def test_up_writes_each_childs_lines_to_its_file_and_logs_shows_them(make_host):
    host = make_host([daemon_yaml("probe")]).start()
    host.wait_ready("probe")
    logs = host.runtime / "logs"
    config = str(host.config)
    with pytest.raises(modelhost.EngineError):
        host.client().call("probe", "fail", message="first-marker")
    text = wait_for_text(logs / "probe.log", "first-marker", host)
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    for name in ("probe", "broker"):
        assert stat.S_IMODE((logs / (name + ".log")).stat().st_mode) == 0o600
    # The daemon's own lines, its request's traceback (rid and all), and the
    # supervisor's lines about it.
    assert re.search(r"INFO daemon=probe starting: CPython", text)
    failure = next(line for line in text.splitlines() if "first-marker" in line)
    assert re.search(r"ERROR daemon=probe rid=\S+ fail raised ValueError: first-marker$",
                     failure), failure
    assert "Traceback (most recent call last):" in text
    assert re.search(r"INFO supervisor daemon=probe started: pid \d+", text)
    # The supervisor hears the daemon is ready a little after `ps` says so.
    text = wait_for_text(logs / "probe.log", "supervisor daemon=probe ready after", host)
    broker_text = wait_for_text(logs / "broker.log", "listening", host)
    assert "INFO supervisor daemon=broker started: pid" in broker_text
    assert "supervisor daemon=probe started" not in broker_text

    # The last lines, as the file has them.
    shown = subprocess.run([sys.executable, "-m", "modelhost.cli", "logs", "probe", "--config",
                            config, "-n", "3"], stdout=subprocess.PIPE, timeout=60, check=True)
    shown_lines = shown.stdout.decode().splitlines()
    assert len(shown_lines) == 3
    assert shown.stdout.decode() in (logs / "probe.log").read_text()

    # An unknown name: the names that have logs, exit 2.
    unknown = subprocess.run([sys.executable, "-m", "modelhost.cli", "logs", "nope",
                              "--config", config], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=60)
    assert unknown.returncode == 2
    assert "broker, probe" in unknown.stderr.decode() and not unknown.stdout

    # Following: a new line of the daemon shows up while the command runs.
    follower = Follower(["probe", "--config", config, "-f", "-n", "1"])
    try:
        follower.wait_for(lambda line: True)  # the one old line: it is reading now
        with pytest.raises(modelhost.EngineError):
            host.client().call("probe", "fail", message="second-marker")
        line = follower.wait_for(lambda line: "second-marker" in line)
        assert "daemon=probe rid=" in line
    finally:
        assert follower.stop() == 0


def test_logs_prints_the_last_lines_across_the_rotated_file(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "tts.log.1").write_bytes(b"".join(b"old %d\n" % i for i in range(1, 6)))
    (logs / "tts.log").write_bytes(b"new 1\nnew 2\n")
    monkeypatch.setenv("MODELHOST_RUNTIME_DIR", str(tmp_path))
    for block in (7, 65536):  # reading backwards across block boundaries
        monkeypatch.setattr(_logs, "BLOCK", block)
        for count, expected in [(1, b"new 2\n"), (2, b"new 1\nnew 2\n"),
                                (4, b"old 4\nold 5\nnew 1\nnew 2\n"),
                                (100, (logs / "tts.log.1").read_bytes() + b"new 1\nnew 2\n"),
                                (0, b"")]:
            out = BytesIO()
            assert _logs.main("tts", count, out=out) == 0
            assert out.getvalue() == expected, (block, count)
    # A last line that has no newline yet is a line too.
    (logs / "tts.log").write_bytes(b"new 1\nnew 2\npartial")
    out = BytesIO()
    assert _logs.main("tts", 2, out=out) == 0
    assert out.getvalue() == b"new 2\npartial"


def run_logs(args, env):
    return subprocess.run([sys.executable, "-m", "modelhost.cli", "logs"] + args,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=60)


def test_logs_of_an_unknown_name_lists_those_that_have_logs(tmp_path):
    (tmp_path / "logs").mkdir()
    for name in ("broker.log", "tts.log", "old.log.1"):
        (tmp_path / "logs" / name).write_text("x\n")
    env = dict(os.environ, MODELHOST_RUNTIME_DIR=str(tmp_path),
               XDG_CONFIG_HOME=str(tmp_path / "no-units"))
    for name in ("nope", "../logs/tts", ".log"):
        result = run_logs([name], env)
        assert result.returncode == 2 and not result.stdout
        assert "these have logs in {}: broker, old, tts".format(tmp_path / "logs") \
            in result.stderr.decode()
    empty = run_logs(["tts"], dict(env, MODELHOST_RUNTIME_DIR=str(tmp_path / "empty")))
    assert empty.returncode == 2 and "modelhost up" in empty.stderr.decode()


def test_logs_under_systemd_points_at_journalctl(tmp_path):
    units = tmp_path / "config" / "systemd" / "user"
    units.mkdir(parents=True)
    (units / "modelhost-broker.service").write_text("[Service]\n")
    env = dict(os.environ, MODELHOST_RUNTIME_DIR=str(tmp_path / "run"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))
    daemon = run_logs(["tts"], env)
    assert daemon.returncode == 2
    assert "journalctl --user -u modelhost-daemon@tts -f" in daemon.stderr.decode()
    broker = run_logs(["broker", "-f"], env)
    assert broker.returncode == 2
    assert "journalctl --user -u modelhost-broker -f" in broker.stderr.decode()


def test_logs_follow_survives_rotation_and_stops_on_ctrl_c(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "LOG_MAX_BYTES", 200)
    log_file = supervisor.LogFile("tts", tmp_path / "logs")
    for i in range(3):
        log_file.write(b"before %02d\n" % i)
    follower = Follower(["tts", "-f", "-n", "2"],
                        env=dict(os.environ, MODELHOST_RUNTIME_DIR=str(tmp_path)))
    try:
        assert follower.wait_for(lambda line: True) == "before 01"
        assert follower.wait_for(lambda line: True) == "before 02"
        # 30 lines of 20 bytes through a 200-byte limit: several rotations,
        # and every line comes out once, in order.
        for i in range(30):
            log_file.write(b"after %02d ---------\n" % i)
            assert follower.wait_for(lambda line: True) == "after %02d ---------" % i
        assert (tmp_path / "logs" / "tts.log.1").exists()
        # Also a rotation by someone else (logrotate-style), and a truncation.
        log_file.close()
        os.replace(str(tmp_path / "logs" / "tts.log"), str(tmp_path / "logs" / "tts.log.1"))
        (tmp_path / "logs" / "tts.log").write_bytes(b"a new file\n")
        assert follower.wait_for(lambda line: True) == "a new file"
        # Shorter than what was read, so the follower sees it whenever it looks.
        (tmp_path / "logs" / "tts.log").write_bytes(b"short\n")
        assert follower.wait_for(lambda line: True) == "short"
    finally:
        log_file.close()
        assert follower.stop() == 0
