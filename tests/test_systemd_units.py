"""The systemd units `modelhost install-systemd` renders, checked by systemd itself.

`systemd-analyze verify` parses each unit as systemd would (directives,
values, that the commands exist) and prints what it would ignore or reject;
its exit status stays 0 for ignored lines, so the tests also require that it
prints nothing. The polkit rule for a system broker is JavaScript: node, when
installed, parses it and runs it against the questions polkit would ask.
"""

import json
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

from modelhost.broker import systemd_units

from conftest import daemon_yaml

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is missing: tests/run installs Debian's systemd package when it can")


def verify(directory, *units):
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], cwd=str(directory),
                          env={"SYSTEMD_UNIT_PATH": "{}:".format(directory),
                               "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).strip()


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("broker:\n  state_dir: {}\ndaemons:\n".format(tmp_path / "state")
                    + daemon_yaml("tts", env="{OMP_NUM_THREADS: '2'}")
                    + daemon_yaml("video", concurrency=2))
    return path


def render(config_file, target, user=False):
    config = systemd_units.load_for_systemd(str(config_file), user)
    files = systemd_units.render(config, target, user=user)
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


@needs_systemd_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_rendered_units_pass_systemd_analyze_verify(config_file, tmp_path, user):
    target = tmp_path / "units"
    files = render(config_file, target, user=user)
    assert set(files) == {
        "modelhost-broker.service", "modelhost-daemon@.service", "modelhost.target",
        "modelhost/tts.json", "modelhost/video.json",
        "modelhost-daemon@tts.service.d/modelhost.conf",
        "modelhost-daemon@video.service.d/modelhost.conf"}
    status, output = verify(target, "modelhost-broker.service", "modelhost.target",
                            "modelhost-daemon@tts.service", "modelhost-daemon@video.service")
    assert (status, output) == (0, "")


def test_the_units_say_what_the_issue_asks(config_file, tmp_path):
    files = render(config_file, tmp_path / "units")
    broker = files["modelhost-broker.service"]
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=modelhost",
                 "RuntimeDirectory=modelhost", "RuntimeDirectoryMode=0750",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "PartOf=modelhost.target", "--config {}".format(config_file)):
        assert line in broker, line
    assert "\nPrivateDevices=" not in broker  # the GPU's device nodes stay reachable
    drop_in = files["modelhost-daemon@tts.service.d/modelhost.conf"]
    assert "ExecStart=\nExecStart={} -m modelhost.daemons.run tts --spec {}".format(
        sys.executable, tmp_path / "units" / "modelhost" / "tts.json") in drop_in
    assert 'Environment=OMP_NUM_THREADS="2"' in drop_in
    target = files["modelhost.target"]
    assert "modelhost-daemon@tts.service modelhost-daemon@video.service" in target
    assert "WantedBy=multi-user.target" in target


def test_user_units_have_no_service_account(config_file, tmp_path):
    files = render(config_file, tmp_path / "units", user=True)
    assert "User=" not in files["modelhost-broker.service"]
    assert "WantedBy=default.target" in files["modelhost.target"]


@needs_systemd_analyze
def test_the_check_can_fail(config_file, tmp_path):
    target = tmp_path / "units"
    render(config_file, target)
    unit = target / "modelhost-broker.service"
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    status, output = verify(target, "modelhost-broker.service")
    assert "Type" in output or "type" in output


def test_dry_run_prints_and_writes_nothing(config_file, tmp_path):
    done = subprocess.run([sys.executable, "-m", "modelhost", "install-systemd", "--config",
                           str(config_file), "--dir", str(tmp_path / "units"), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "# --- {}".format(tmp_path / "units" / "modelhost-broker.service") in done.stdout
    assert "Type=notify" in done.stdout and not (tmp_path / "units").exists()


def install_systemd(config_file, *args):
    done = subprocess.run([sys.executable, "-m", "modelhost", "install-systemd", "--config",
                           str(config_file), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_broker_unit_tells_the_broker_its_systemctl_scope(config_file, tmp_path):
    assert "--systemd system\n" in render(config_file, tmp_path / "s")["modelhost-broker.service"]
    assert "--systemd user\n" in render(config_file, tmp_path / "u", user=True)[
        "modelhost-broker.service"]


def test_the_polkit_rule_lets_the_service_user_start_and_stop_daemon_units_only():
    path, text = systemd_units.polkit_rule()
    assert str(path) == "/etc/polkit-1/rules.d/50-modelhost.rules"
    for needed in ('"org.freedesktop.systemd1.manage-units"', 'subject.user !== "modelhost"',
                   '"modelhost-daemon@"', '".service"', '["start", "stop", "restart"]',
                   'action.lookup("unit")', 'action.lookup("verb")', "polkit.Result.YES"):
        assert needed in text, needed
    elsewhere, same = systemd_units.polkit_rule(Path("/tmp/units"))
    assert (elsewhere, same) == (Path("/tmp/units/polkit-1/rules.d/50-modelhost.rules"), text)


# What polkit would ask, and whether the rule says yes (polkit.Result.YES).
POLKIT_CASES = [
    ("modelhost", "org.freedesktop.systemd1.manage-units", "modelhost-daemon@tts.service",
     "start", True),
    ("modelhost", "org.freedesktop.systemd1.manage-units", "modelhost-daemon@tts.service",
     "stop", True),
    ("modelhost", "org.freedesktop.systemd1.manage-units", "modelhost-daemon@video.service",
     "restart", True),
    ("modelhost", "org.freedesktop.systemd1.manage-units", "modelhost-daemon@tts.service",
     "reload", False),
    ("modelhost", "org.freedesktop.systemd1.manage-units", "modelhost-broker.service",
     "stop", False),
    ("modelhost", "org.freedesktop.systemd1.manage-units", "modelhost-daemon@.service",
     "start", False),
    ("modelhost", "org.freedesktop.systemd1.manage-units", "modelhost-daemon@tts.socket",
     "start", False),
    ("modelhost", "org.freedesktop.systemd1.manage-units", "sshd.service", "stop", False),
    ("modelhost", "org.freedesktop.systemd1.manage-unit-files", "modelhost-daemon@tts.service",
     "start", False),
    ("nobody", "org.freedesktop.systemd1.manage-units", "modelhost-daemon@tts.service",
     "start", False),
]

POLKIT_HARNESS = """
const rules = [];
global.polkit = {Result: {YES: "yes", NO: "no", NOT_HANDLED: null},
                 addRule: function (rule) { rules.push(rule); }};
require(process.argv[2]);
const answers = JSON.parse(process.argv[3]).map(function (c) {
    const details = {unit: c[2], verb: c[3]};
    return rules[0]({id: c[1], lookup: function (key) { return details[key]; }},
                    {user: c[0]}) === "yes";
});
console.log(JSON.stringify(answers));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_polkit_rule_is_javascript_that_answers_as_meant(tmp_path):
    _, text = systemd_units.polkit_rule()
    rule = tmp_path / "50-modelhost.js"
    rule.write_text(text)
    checked = subprocess.run(["node", "--check", str(rule)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stderr
    harness = tmp_path / "harness.js"
    harness.write_text(POLKIT_HARNESS)
    done = subprocess.run(["node", str(harness), str(rule),
                           json.dumps([case[:4] for case in POLKIT_CASES])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [case[4] for case in POLKIT_CASES]


def test_install_systemd_writes_the_polkit_rule_for_a_system_broker_only(config_file, tmp_path):
    rule = "polkit-1/rules.d/50-modelhost.rules"
    shown = install_systemd(config_file, "--dir", str(tmp_path / "system"), "--dry-run")
    assert "# --- {}\n".format(tmp_path / "system" / rule) in shown
    assert systemd_units.polkit_rule()[1] in shown
    # Installed to the default unit dir, it goes to polkit's own.
    assert "# --- /etc/polkit-1/rules.d/50-modelhost.rules\n" in install_systemd(
        config_file, "--dry-run")
    assert "polkit" not in install_systemd(config_file, "--user", "--dir",
                                           str(tmp_path / "user"), "--dry-run")
    install_systemd(config_file, "--dir", str(tmp_path / "system"))
    assert (tmp_path / "system" / rule).read_text() == systemd_units.polkit_rule()[1]
    install_systemd(config_file, "--user", "--dir", str(tmp_path / "user"))
    assert (tmp_path / "user" / "modelhost-broker.service").exists()
    assert not (tmp_path / "user" / "polkit-1").exists()
