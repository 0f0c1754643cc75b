"""The systemd units `modelhost install-systemd` renders, checked by systemd itself.

`systemd-analyze verify` parses each unit as systemd would (directives,
values, that the commands exist) and prints what it would ignore or reject;
its exit status stays 0 for ignored lines, so the tests also require that it
prints nothing.
"""

import shutil
import subprocess
import sys

import pytest

from modelhost.broker import systemd_units

from conftest import daemon_yaml

pytestmark = pytest.mark.skipif(
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
