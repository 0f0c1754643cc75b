"""`modelhost top` and `modelhost ps --watch`: the render functions on real status dicts
from a real `modelhost up`, and the commands themselves as processes, with stdout a pipe
(one frame) and a pseudo-terminal (the live view, Ctrl-C)."""

import copy
import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

import modelhost as modelhost_package
from conftest import Host, daemon_yaml
from modelhost import _format, cli
from modelhost.errors import BrokerUnavailable

pytest.importorskip("rich")
from rich.console import Console  # noqa: E402

from modelhost import _top  # noqa: E402

DAEMONS = ("probe", "second")


def registered(status):
    # Registered (a pid) rather than ready: the view must show daemons in any state.
    return all(any(d["name"] == name and d.get("pid") for d in status["daemons"])
               for name in DAEMONS)


@pytest.fixture(scope="module")
def host():
    host = Host([daemon_yaml("probe", max_queue=3), daemon_yaml("second")]).start()
    try:
        host.wait_for(registered, what="both daemons to register")
        yield host
    finally:
        host.stop()


def text_of(renderable, width=200):
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def line_with(text, word):
    lines = [line for line in text.splitlines() if word in line]
    assert lines, "no line with {!r} in:\n{}".format(word, text)
    return lines[0]


def modelhost(*args, **options):
    return subprocess.run([sys.executable, "-m", "modelhost.cli"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60, **options)


# --- the render functions, on what a real broker reports ----------------------------

def test_render_shows_the_real_devices_and_daemons(host):
    status = host.ps()
    text = text_of(_top.render(status))
    broker = status["broker"]
    assert "broker pid {}".format(broker["pid"]) in text
    assert "probe {}".format(status["memory"]["probe"]) in text
    assert status["memory"]["devices"], status
    for device in status["memory"]["devices"]:
        row = line_with(text, "│ {} ".format(device["id"]))
        assert _format.size(device["used"]) in row
        assert _format.size(device["total"]) in row
        if device.get("threshold"):
            # The bar's percentage: committed (else used) of the threshold.
            held = device["committed"] if device.get("committed") is not None else device["used"]
            assert "{:3.0f}%".format(100.0 * held / device["threshold"]) in row
    for row in status["daemons"]:
        line = line_with(text, "│ {} ".format(row["name"]))
        assert row["state"] in line and row["tier"] in line
        assert "{}/{}".format(row["running"], row["concurrency"]) in line
    assert "no calls waiting or running" in text


def test_render_queues_errors_pins_and_ttls(host):
    status = copy.deepcopy(host.ps())
    busy = next(row for row in status["daemons"] if row["name"] == "probe")
    busy.update(queued=2, running=1, pinned=True,
                last_error="CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.6 GiB "
                           "total)\nTraceback (most recent call last): ...")
    idle = next(row for row in status["daemons"] if row["name"] == "second")
    idle.update(ttl_s=250.4)
    text = text_of(_top.render(status))
    queues = text[text.index("queues"):]
    queue_row = line_with(queues, "│ probe ")
    assert "2/{}".format(busy["max_queue"]) in queue_row and "1/1" in queue_row
    assert " 67%" in queue_row  # 2 of a queue of 3
    assert "second" not in queues  # nothing waiting there
    daemon_row = line_with(text, "│ probe ")
    assert "yes" in daemon_row  # pinned
    assert "CUDA out of memory. Tried to allocate" in daemon_row  # shortened, not cut off
    assert "…" in daemon_row and "total)" not in daemon_row
    assert "Traceback" not in text
    assert "4m10s" in line_with(text, "│ second ")


def test_render_without_a_broker_says_so():
    error = BrokerUnavailable("no answer from the broker at ipc:///x within 2s")
    text = text_of(_top.render(None, error, "ipc:///x", retry_s=1.0))
    assert "broker unreachable: " in text and "ipc:///x" in text
    assert "retrying every 1s" in text
    assert "daemons" not in text


def test_render_keeps_the_last_status_while_the_broker_is_gone(host):
    status = host.ps()
    text = text_of(_top.render(status, BrokerUnavailable("gone"), host.endpoint,
                               seen_at=time.time(), retry_s=2.0))
    assert "broker unreachable: gone" in text
    assert "the tables below are from " in text
    assert "│ second " in text


def test_device_fraction_and_bar():
    assert _top.device_fraction({"threshold": 100, "committed": 25, "used": 90}) == 0.25
    assert _top.device_fraction({"threshold": 100, "used": 90}) == 0.9
    assert _top.device_fraction({"total": 200, "used": 50}) == 0.25
    assert _top.device_fraction({"id": "gpu0"}) is None
    assert text_of(_top.bar(None)).strip() == "-"
    full = text_of(_top.bar(1.5)).strip()
    assert full.startswith("█" * _top.BAR_WIDTH) and full.endswith("150%")
    assert text_of(_top.bar(0.0)).strip() == "░" * _top.BAR_WIDTH + "   0%"


def test_shorten_keeps_the_first_line():
    assert _top.shorten(None) == ""
    assert _top.shorten("short\nmore") == "short"
    assert _top.shorten("x" * 50, width=10) == "x" * 9 + "…"


# --- the commands, stdout not a terminal ---------------------------------------------

def test_top_prints_one_frame_when_not_a_terminal(host):
    result = modelhost("top", "--endpoint", host.endpoint)
    assert result.returncode == 0, result.stderr
    for device in host.ps()["memory"]["devices"]:
        assert "│ {} ".format(device["id"]) in result.stdout
    for name in DAEMONS:
        assert "│ {} ".format(name) in result.stdout
    assert "unreachable" not in result.stdout


def test_top_without_a_broker_says_so_and_fails(tmp_path):
    endpoint = "ipc://{}/nobody.sock".format(tmp_path)
    result = modelhost("top", "--endpoint", endpoint, "--timeout", "0.5")
    assert result.returncode == cli.EXIT_ERROR
    assert "broker unreachable" in result.stdout
    assert result.stderr.startswith("modelhost: ")
    assert endpoint in result.stderr and "modelhost up" in result.stderr


def test_ps_watch_count_prints_that_many_frames(host):
    result = modelhost("ps", "--endpoint", host.endpoint, "--watch", "--count", "2",
                       "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    frames = result.stdout.rstrip("\n").split("\n\n")
    assert len(frames) == 2, result.stdout
    for frame in frames:
        assert frame.startswith("broker pid ")
        names = [line.split()[0] for line in frame.splitlines()[1:] if line.strip()]
        assert set(DAEMONS) <= set(names), frame
    assert "\033[" not in result.stdout  # no screen clearing into a pipe


def test_ps_watch_json_prints_one_status_a_line(host):
    result = modelhost("ps", "--endpoint", host.endpoint, "--json", "--count", "3",
                       "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert {d["name"] for d in json.loads(line)["daemons"]} >= set(DAEMONS)


def test_ps_watch_without_a_broker_keeps_going_then_fails(tmp_path):
    result = modelhost("ps", "--endpoint", "ipc://{}/nobody.sock".format(tmp_path),
                       "--count", "2", "--interval", "0.1", "--timeout", "0.3")
    assert result.returncode == cli.EXIT_ERROR
    frames = result.stdout.rstrip("\n").split("\n\n")
    assert len(frames) == 2 and all("modelhost up" in frame for frame in frames)


@pytest.mark.parametrize("argv", [["top", "--interval", "0"], ["ps", "--count", "0"],
                                  ["ps", "--watch", "--interval", "-1"]])
def test_intervals_and_counts_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "must be more than 0" in capsys.readouterr().err


def test_top_without_rich_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    # None in sys.modules makes `import rich...` fail as if it were not installed.
    for name in [name for name in sys.modules if name == "rich" or name.startswith("rich.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.delitem(sys.modules, "modelhost._top")
    monkeypatch.delattr(modelhost_package, "_top")  # else `from . import _top` finds it
    code = cli.main(["top", "--endpoint", "ipc://{}/nobody.sock".format(tmp_path)])
    assert code == cli.EXIT_USAGE
    assert "pip install rich" in capsys.readouterr().err


# --- on a terminal ----------------------------------------------------------------------

class Terminal(object):
    """A command on a pseudo-terminal, 160 columns wide, its output collected."""

    def __init__(self, *args):
        import fcntl
        import struct
        import termios

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        env = dict(os.environ, TERM="xterm-256color")
        env.pop("COLUMNS", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modelhost.cli"] + list(args),
            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.output = b""

    def read_until(self, predicate, timeout=30.0, what="the output"):
        deadline = time.monotonic() + timeout
        while not predicate(self.output.decode("utf-8", "replace")):
            if time.monotonic() > deadline:
                raise AssertionError("no {} within {}s; got:\n{!r}".format(
                    what, timeout, self.output[-3000:]))
            self._read(0.2)
        return self.output.decode("utf-8", "replace")

    def _read(self, wait):
        if select.select([self.master], [], [], wait)[0]:
            try:
                self.output += os.read(self.master, 65536)
            except OSError:  # EIO: the other end closed
                time.sleep(wait)

    def wait(self, timeout=30.0):
        code = self.process.wait(timeout)
        while select.select([self.master], [], [], 0.1)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.output += chunk
        return code

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def terminal():
    terminals = []

    def start(*args):
        terminals.append(Terminal(*args))
        return terminals[-1]

    yield start
    for each in terminals:
        each.close()


def test_top_on_a_terminal_retries_until_the_broker_comes_then_quits_on_ctrl_c(
        make_host, terminal):
    late = make_host([daemon_yaml("late")])
    top = terminal("top", "--endpoint", late.endpoint, "--interval", "0.2", "--timeout", "0.5")
    top.read_until(lambda out: out.count("broker unreachable") >= 2,
                   what="the unreachable message, twice (it keeps retrying)")
    assert top.process.poll() is None
    late.start()
    top.read_until(lambda out: "│ late " in out, timeout=60, what="the daemon's row")
    top.process.send_signal(signal.SIGINT)
    assert top.wait() == 0
    assert "Traceback" not in top.output.decode("utf-8", "replace")


def test_ps_watch_on_a_terminal_redraws_in_place(host, terminal):
    watch = terminal("ps", "--endpoint", host.endpoint, "--count", "2", "--interval", "0.1")
    assert watch.wait() == 0
    output = watch.output.decode("utf-8", "replace")
    assert output.count("\033[H\033[2J") == 2
    assert output.count("broker pid ") == 2


def test_ps_watch_on_a_terminal_stops_on_ctrl_c(host, terminal):
    watch = terminal("ps", "--endpoint", host.endpoint, "--watch", "--interval", "0.1")
    watch.read_until(lambda out: out.count("broker pid ") >= 2, what="two frames")
    watch.process.send_signal(signal.SIGINT)
    assert watch.wait() == 0
