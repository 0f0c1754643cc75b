"""The broker under systemd (`--systemd user`): it stops and starts the daemons' units.

This machine runs no systemd, so `tests/standins/systemctl`, first on PATH,
stands in for the systemctl verbs the broker uses (start, stop, show of
`modelhost-daemon@NAME.service`); it runs each unit's ExecStart from the
drop-in that the real `modelhost install-systemd --dir` wrote, and logs every
call it gets, so the tests can check what the broker asked.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from modelhost.broker.systemd_daemons import PROPERTIES, SystemdDaemons
from modelhost.protocol import Tier

from conftest import ROOT, Host, daemon_yaml, pid_alive
from test_memory_host import BROKER, DECLARED, RESIDENT_MIB, THRESHOLD_MIB, MiB, Sampler

STANDINS = ROOT / "tests" / "standins"
SYSTEMCTL = STANDINS / "systemctl"


def unit(name):
    return "modelhost-daemon@{}.service".format(name)


def standin_env(directory):
    return dict(os.environ, PATH="{}{}{}".format(STANDINS, os.pathsep, os.environ["PATH"]),
                MODELHOST_STANDIN_SYSTEMD_DIR=str(directory))


def calls(directory):
    path = Path(directory) / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def stop_standin_units(directory, names):
    """Every process the stand-in started is gone afterwards, whatever happened."""
    env = standin_env(directory)
    subprocess.run([str(SYSTEMCTL), "--user", "stop"] + [unit(name) for name in names],
                   env=env, capture_output=True, timeout=60)
    for state in Path(directory).glob("*.state"):
        try:
            pid = json.loads(state.read_text()).get("pid")
        except ValueError:
            continue
        if pid and pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- reading `systemctl show` ------------------------------------------------------------

# What systemd 252 prints for `systemctl show --property=Id,ActiveState,SubState,MainPID,
# NRestarts,Result` of four units: the service's properties come before the unit's.
SHOW = """\
Result=success
NRestarts=0
MainPID=4242
Id=modelhost-daemon@tts.service
ActiveState=active
SubState=running

Result=exit-code
NRestarts=3
MainPID=0
Id=modelhost-daemon@video.service
ActiveState=activating
SubState=auto-restart

Result=exit-code
NRestarts=5
MainPID=0
Id=modelhost-daemon@music.service
ActiveState=failed
SubState=failed

Result=success
NRestarts=0
MainPID=0
Id=modelhost-daemon@chat.service
ActiveState=inactive
SubState=dead

Result=success
NRestarts=0
MainPID=77
Id=modelhost-daemon@unknown.service
ActiveState=active
SubState=running
"""


def test_parse_reads_each_state_of_systemctl_show():
    report = SystemdDaemons(["tts", "video", "music", "chat", "starting", "leaving"],
                            "user").parse(
        SHOW + "\nResult=success\nNRestarts=1\nMainPID=91\nId=modelhost-daemon@starting"
        ".service\nActiveState=activating\nSubState=start\n"
        "\nResult=success\nNRestarts=0\nMainPID=93\nId=modelhost-daemon@leaving"
        ".service\nActiveState=deactivating\nSubState=stop-sigterm\n")
    # Still alive while it stops: not yet "stopped", which would fail its queued calls.
    assert report["leaving"]["status"] == "stopping" and report["leaving"]["pid"] == 93
    assert report["tts"] == {"status": "running", "pid": 4242, "restarts": 0, "error": None}
    assert report["chat"] == {"status": "stopped", "pid": None, "restarts": 0, "error": None}
    assert report["starting"] == {"status": "starting", "pid": 91, "restarts": 1, "error": None}
    video, music = report["video"], report["music"]
    assert (video["status"], video["pid"], video["restarts"]) == ("backoff", None, 3)
    assert (music["status"], music["pid"], music["restarts"]) == ("failed", None, 5)
    assert "exit-code" in music["error"]
    assert "journalctl --user -u {}".format(unit("music")) in music["error"]
    assert "exit-code" in video["error"]
    assert "unknown" not in report  # not a daemon of this configuration


def test_parse_of_nothing_is_an_empty_report():
    assert SystemdDaemons(["tts"], "system").parse("") == {}


# --- SystemdDaemons against the stand-in ------------------------------------------------

@pytest.fixture
def standin_dir(monkeypatch):
    directory = Path(tempfile.mkdtemp(prefix="mh-sd-", dir="/tmp"))
    monkeypatch.setenv("MODELHOST_STANDIN_SYSTEMD_DIR", str(directory))
    yield directory
    stop_standin_units(directory, ["sleeper"])
    shutil.rmtree(directory, ignore_errors=True)


def sleeper_unit(directory):
    drop_in = directory / (unit("sleeper") + ".d")
    drop_in.mkdir()
    (drop_in / "modelhost.conf").write_text(
        "[Service]\nExecStart=\nExecStart={} -c \"import time; time.sleep(120)\"\n".format(
            sys.executable))


def poll_until(daemons, predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        report = daemons.poll()
        if report is not None:
            last = report
            if predicate(report):
                return report
        time.sleep(0.05)
    raise AssertionError("timed out waiting for {}; last report {}".format(what, last))


def test_set_running_starts_and_stops_the_unit_and_poll_reports_it(standin_dir):
    sleeper_unit(standin_dir)
    daemons = SystemdDaemons(["sleeper"], "user", systemctl=str(SYSTEMCTL))
    try:
        daemons.set_running("sleeper", True)
        report = poll_until(daemons, lambda r: r["sleeper"]["status"] == "running",
                            "the unit to run")
        pid = report["sleeper"]["pid"]
        assert pid and pid_alive(pid)
        assert "--user --no-block start {}".format(unit("sleeper")) in calls(standin_dir)
        assert "--user show --property={} {}".format(",".join(PROPERTIES), unit("sleeper")) \
            in calls(standin_dir)
        daemons.set_running("sleeper", False)
        # While it stops the unit is deactivating ("stopping", with its pid), then stopped.
        report = poll_until(daemons, lambda r: r["sleeper"]["status"] == "stopped"
                            and r["sleeper"]["pid"] is None, "the unit to stop")
        assert report["sleeper"] == {"status": "stopped", "pid": None, "restarts": 0,
                                     "error": None}
        assert not pid_alive(pid)
        assert "--user --no-block stop {}".format(unit("sleeper")) in calls(standin_dir)
    finally:
        daemons.close()


def test_a_unit_whose_process_died_is_failed(standin_dir):
    sleeper_unit(standin_dir)
    daemons = SystemdDaemons(["sleeper"], "system", systemctl=str(SYSTEMCTL))
    try:
        daemons.set_running("sleeper", True)
        pid = poll_until(daemons, lambda r: r["sleeper"]["status"] == "running",
                         "the unit to run")["sleeper"]["pid"]
        os.kill(pid, signal.SIGKILL)
        report = poll_until(daemons, lambda r: r["sleeper"]["status"] == "failed",
                            "the unit to fail")
        assert "exit-code" in report["sleeper"]["error"]
        assert "--no-block start {}".format(unit("sleeper")) in calls(standin_dir)  # no --user
    finally:
        daemons.close()


def logged(caplog, word, level):
    return [r.getMessage() for r in caplog.records
            if r.levelno >= level and " {} ".format(word) in r.getMessage()]


def test_a_failing_systemctl_is_logged_and_raises_nothing(tmp_path, caplog):
    failing = tmp_path / "systemctl"
    failing.write_text("#!/bin/sh\necho 'Failed to connect to bus: No such file or directory' "
                       ">&2\nexit 1\n")
    failing.chmod(0o755)
    daemons = SystemdDaemons(["tts"], "user", systemctl=str(failing))
    caplog.set_level(logging.INFO, logger="modelhost.broker")
    try:
        daemons.set_running("tts", False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                logged(caplog, "stop", logging.ERROR) and logged(caplog, "show", logging.WARNING)):
            assert daemons.poll() is None  # no report from a systemctl that failed
            time.sleep(0.05)
    finally:
        daemons.close()
    stop, = logged(caplog, "stop", logging.ERROR)
    assert "exit 1" in stop and "Failed to connect to bus" in stop and "polkit" in stop
    show = logged(caplog, "show", logging.WARNING)[0]
    assert "exit 1" in show and "Failed to connect to bus" in show
    assert daemons.orders == []


def test_a_missing_systemctl_is_logged_and_raises_nothing(tmp_path, caplog):
    daemons = SystemdDaemons(["tts"], "user", systemctl=str(tmp_path / "no-systemctl"))
    caplog.set_level(logging.INFO, logger="modelhost.broker")
    daemons.set_running("tts", True)
    assert daemons.poll() is None and daemons.orders == [] and daemons.query is None
    daemons.close()
    assert any("cannot run" in r.getMessage() and "start" in r.getMessage()
               for r in caplog.records if r.levelno >= logging.ERROR)


# --- end to end: install-systemd, the units through the stand-in, a broker with --systemd -----

class SystemdHost(Host):
    """Units rendered by the real install-systemd, daemons started through the stand-in,
    and the broker alone (`python -m modelhost.broker --systemd user`) as the process
    that Host watches and stops."""

    def __init__(self, daemons, names):
        super().__init__(daemons, dict(BROKER, http="null"))
        self.units = self.dir / "units"
        self.units.mkdir()
        self.names = names
        self.env = standin_env(self.units)
        self.log_path = self.dir / "broker.log"

    def install(self):
        done = subprocess.run([sys.executable, "-m", "modelhost", "install-systemd", "--user",
                               "--dir", str(self.units), "--config", str(self.config)],
                              capture_output=True, text=True, timeout=60, env=self.env)
        assert done.returncode == 0, done.stderr

    def systemctl(self, *args):
        return subprocess.run(["systemctl", "--user"] + list(args), env=self.env,
                              capture_output=True, text=True, timeout=60)

    def show(self):
        done = self.systemctl("show", "--property=" + ",".join(PROPERTIES),
                              *[unit(name) for name in self.names])
        assert done.returncode == 0, done.stderr
        return SystemdDaemons(self.names, "user").parse(done.stdout)

    def start_broker(self):
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modelhost.broker", "--config", str(self.config),
             "--systemd", "user"], env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def calls(self):
        return calls(self.units)

    def log(self):
        text = super().log()
        for name in self.names:
            path = self.units / (name + ".log")
            if path.exists():
                text += "\n--- daemon {} ---\n{}".format(name, path.read_text(errors="replace"))
        return text

    def stop(self):
        # The units first: their state lives in the directory that Host.stop removes.
        try:
            stop_standin_units(self.units, self.names)
        finally:
            super().stop()  # the broker, on SIGINT


@pytest.fixture
def systemd_host(test_venvs):
    venv = test_venvs["py312"]
    hosts = []

    def make():
        def memory(name, engine="memory_engine:MemoryEngine", **settings):
            return daemon_yaml(name, venv=venv, engine=engine, memory=DECLARED, **settings)

        host = SystemdHost([
            memory("a", engine="memory_engine:MemoryEngineNoOffload",
                   options="{{resident_mib: {}, leak_on_unload: true}}".format(RESIDENT_MIB)),
            memory("b", options="{{resident_mib: {}}}".format(RESIDENT_MIB)),
            memory("c", options="{{resident_mib: {}}}".format(RESIDENT_MIB), preload="false"),
        ], ["a", "b", "c"])
        host.venv = venv
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.stop()


@pytest.mark.slow
def test_under_systemd_the_broker_stops_and_starts_units_to_free_memory(systemd_host):
    host = systemd_host()
    host.install()
    drop_in = (host.units / (unit("a") + ".d") / "modelhost.conf").read_text()
    assert "ExecStart={} -m modelhost.daemons.run a --spec {}\n".format(
        host.venv / "bin" / "python", host.units / "modelhost" / "a.json") in drop_in
    assert shutil.which("systemctl", path=host.env["PATH"]) == str(SYSTEMCTL)
    started = host.systemctl("start", unit("a"), unit("b"), unit("c"))
    assert started.returncode == 0, started.stderr
    host.start_broker()
    host.wait_for(lambda status: {d["name"]: d["state"] for d in status["daemons"]} == {
        "a": "ready", "b": "ready", "c": "unloaded"}, what="daemons to register and preload")
    # The broker spawns nothing: the three processes are the stand-in's.
    units = host.show()
    rows = {d["name"]: d for d in host.ps()["daemons"]}
    assert {name: rows[name]["pid"] for name in "abc"} == {
        name: units[name]["pid"] for name in "abc"}
    assert all(units[name]["status"] == "running" for name in "abc")
    old_a = rows["a"]["pid"]

    client = host.client()
    client.call("b", "work", priority="interactive")  # b serves urgent work: a is the victim
    sampler = Sampler(host)
    sampler.start()
    try:
        assert client.call("c", "work", peak_mib=20, timeout=60)["resident_mib"] == RESIDENT_MIB
    finally:
        peak = sampler.stop()
    assert "--user --no-block stop {}".format(unit("a")) in host.calls()
    a = host.daemon("a")
    assert a["tier"] == Tier.STOPPED and a["state"] == "stopped"
    assert a["footprint"]["measured"]["unloaded"] > RESIDENT_MIB * MiB  # the leak, remembered
    assert not pid_alive(old_a)
    assert peak <= THRESHOLD_MIB * MiB, "sampled {:.0f} MiB".format(peak / MiB)
    host.wait_for(lambda status: host.show()["a"]["status"] == "stopped"
                  and host.daemon("a")["pid"] is None, what="a's unit to show stopped")
    assert not any("start {}".format(unit("a")) in line for line in host.calls()
                   if "--no-block" in line)

    # Called again, a's unit is started again, and the call is served.
    assert client.call("a", "work", timeout=60)["resident_mib"] == RESIDENT_MIB
    assert "--user --no-block start {}".format(unit("a")) in host.calls()
    a = host.daemon("a")
    assert a["tier"] == Tier.RESIDENT and a["pid"] not in (None, old_a)

    # What ps shows of the processes is what the units report.
    # The stand-in never restarts a unit itself: its state file stands in for systemd's
    # count of automatic restarts (written whole, as the stand-in reads it at any time).
    state = host.units / "b.state"
    (host.units / "b.state.new").write_text(
        json.dumps(dict(json.loads(state.read_text()), restarts=2)))
    os.replace(str(host.units / "b.state.new"), str(state))
    host.wait_for(lambda status: host.daemon("b")["restarts"] == 2, what="b's NRestarts")
    units = host.show()
    rows = {d["name"]: d for d in host.ps()["daemons"]}
    assert {name: (rows[name]["pid"], rows[name]["restarts"]) for name in "abc"} == {
        name: (units[name]["pid"], units[name]["restarts"]) for name in "abc"}
    assert units["b"]["restarts"] == 2 and units["a"]["pid"] == a["pid"]
