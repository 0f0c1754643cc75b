"""`modelhost up` with a daemon whose venv cannot be set up: the others serve, that one
shows `failed` with the setup's last lines and is never started from its broken venv."""

import subprocess
import sys

import pytest

import modelhost
from conftest import ENGINES, daemon_yaml

pytestmark = pytest.mark.slow


def _venv_daemon(name, venv, requirements=None):
    lines = ["  {}:".format(name), "    engine: probe_engine:ProbeEngine",
             "    pythonpath: [{}]".format(ENGINES), "    python: {}".format(sys.executable),
             "    venv: {}".format(venv)]
    if requirements is not None:
        lines.append("    requirements: {}".format(requirements))
    return "\n".join(lines) + "\n"


def _states(status):
    return {d["name"]: d["state"] for d in status["daemons"]}


def _check_never_started(host, row, why):
    assert row["state"] == "failed" and row["pid"] is None and row["restarts"] == 0, row
    assert why in row["last_error"], row["last_error"]
    with pytest.raises(modelhost.DaemonUnavailable, match=why):
        host.client().call("bad", "info")
    # A load cannot help either: no process will come to load it.
    with pytest.raises(modelhost.DaemonUnavailable, match=why):
        host.client().load("bad", timeout=30)
    assert host.client().call("good", "add", a=2, b=3) == 5
    assert "daemon=bad started" not in host.log()
    # The supervisor says modelhost is up once the others are ready, naming the one left out.
    host.wait_for(lambda _: "not started, their setup failed: bad" in host.log(), 30,
                  "the supervisor to say modelhost is up")
    assert "daemon=bad " + why in host.log()  # said once, and kept for `modelhost logs bad`
    table = subprocess.run([sys.executable, "-m", "modelhost.cli", "ps", "--endpoint",
                            host.endpoint], capture_output=True, text=True, timeout=30).stdout
    bad_line = next(line for line in table.splitlines() if line.startswith("bad "))
    assert " failed " in bad_line and why[:20] in bad_line, table


def test_a_daemon_whose_setup_fails_is_failed_in_ps_and_never_started(make_host, tmp_path):
    requirements = tmp_path / "requirements.txt"
    # A local path that does not exist: the install fails at once, with no network.
    requirements.write_text(str(tmp_path / "no-such-package-modelhost-test") + "\n")
    host = make_host([daemon_yaml("good"),
                      _venv_daemon("bad", tmp_path / "bad-venv", requirements)])
    host.start(setup=True)
    status = host.wait_for(lambda s: _states(s) == {"good": "ready", "bad": "failed"}, 300,
                           "good to be ready and bad to have failed")
    row = next(d for d in status["daemons"] if d["name"] == "bad")
    _check_never_started(host, row, "not started: its venv setup failed")
    # The setup's last lines: the installer's command and what it said.
    assert "exited with status" in row["last_error"]
    assert "no-such-package-modelhost-test" in row["last_error"]
    assert "setting up bad failed (see above): not starting it" in host.log()


def test_up_no_setup_does_not_start_a_daemon_from_a_venv_that_was_never_set_up(
        make_host, tmp_path):
    venv = tmp_path / "bare-venv"  # a venv, but without modelhost: its setup never ran
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    host = make_host([daemon_yaml("good"), _venv_daemon("bad", venv)]).start()
    status = host.wait_for(lambda s: _states(s) == {"good": "ready", "bad": "failed"}, 60,
                           "good to be ready and bad to have failed")
    row = next(d for d in status["daemons"] if d["name"] == "bad")
    _check_never_started(host, row, "not started: its venv {} is not set up".format(venv))
