"""modelhost.broker.envs: real venvs in tmp_path, built with real interpreters."""

import json
import os
import subprocess
import time

import pytest

from modelhost.broker import envs
from modelhost.broker.config import DaemonConfig
from modelhost.broker.envs import find_base_interpreter

pytestmark = pytest.mark.slow


def _need_python(version):
    try:
        return find_base_interpreter(version)
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _daemon(name, python, venv, requirements=None):
    return DaemonConfig(name=name, engine="x.y:Z", python=python, venv=venv,
                        requirements=requirements)


def _in_venv(venv, code):
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_uv_py38_with_requirements_created_unchanged_updated(tmp_path, monkeypatch, capsys):
    _need_python("3.8")
    monkeypatch.delenv("MODELHOST_NO_UV", raising=False)
    if envs._pick_installer() != "uv":
        pytest.skip("uv is not installed")
    req = tmp_path / "requirements.txt"
    req.write_text("numpy<2\n")
    venv = tmp_path / "venv38"
    daemon = _daemon("np38", "3.8", venv, req)
    lines = []

    first = envs.setup_daemon(daemon, log=lines.append)
    assert first.action == "created", first.message
    assert all(line.startswith("np38: ") for line in lines)
    assert any("numpy" in line for line in lines)  # the installer's output came through
    assert _in_venv(venv, "import sys; print('%d.%d' % sys.version_info[:2])") == "3.8"
    numpy_version = _in_venv(venv, "import numpy, modelhost.daemons.runtime; print(numpy.__version__)")
    assert numpy_version.startswith("1.")
    stamp = json.loads((venv / envs.FINGERPRINT_FILE).read_text())
    assert stamp["python_version"].startswith("3.8.")
    # Editable: the venv runs the source tree's code.
    root = _in_venv(venv, "import modelhost, os; print(os.path.dirname(os.path.dirname(modelhost.__file__)))")
    assert root == str(envs.project_root())

    lines.clear()
    second = envs.setup_daemon(daemon, log=lines.append)
    assert second.action == "unchanged", second.message
    assert second.message == f"np38: up to date ({stamp['python_version'].split()[0]}, {venv})"
    assert second.seconds < 5 and not lines

    req.write_text("numpy<2\n# a comment changes the file's hash\n")
    third = envs.setup_daemon(daemon, log=lines.append)
    assert third.action == "updated", third.message
    assert envs.setup_daemon(daemon, log=lines.append).action == "unchanged"

    with capsys.disabled():
        print(f"\n[uv, 3.8 + numpy<2] created {first.seconds:.1f}s, unchanged {second.seconds:.2f}s, "
              f"updated {third.seconds:.1f}s")


def test_pip_fallback_py312(tmp_path, monkeypatch, capsys):
    _need_python("3.12")
    monkeypatch.setenv("MODELHOST_NO_UV", "1")
    venv = tmp_path / "venv312"
    daemon = _daemon("plain", "3.12", venv)
    lines = []

    first = envs.setup_daemon(daemon, log=lines.append)
    assert first.action == "created", first.message
    assert "pip" in first.message
    assert any("Successfully installed" in line for line in lines)
    assert _in_venv(venv, "import sys, modelhost.daemons.runtime; print('%d.%d' % sys.version_info[:2])") == "3.12"
    # pip venvs have pip (uv ones do not): proof that this went the pip way.
    assert (venv / "bin" / "pip").exists()

    second = envs.setup_daemon(daemon, log=lines.append)
    assert second.action == "unchanged", second.message

    forced = envs.setup_daemon(daemon, log=lines.append, force=True)
    assert forced.action == "created", forced.message

    with capsys.disabled():
        print(f"\n[pip, 3.12] created {first.seconds:.1f}s, unchanged {second.seconds:.2f}s, "
              f"forced {forced.seconds:.1f}s")


@pytest.mark.parametrize("python", ["3.7", "3.12"])
def test_a_venv_made_by_uv_is_updated_without_uv(tmp_path, monkeypatch, python):
    # uv makes venvs without pip; the next setup may run where uv is gone (another
    # checkout's host venv, another PATH) and must still update it, through pip.
    _need_python(python)
    if envs._uv() is None:
        pytest.skip("uv is not installed")
    req = tmp_path / "requirements.txt"
    req.write_text("# nothing yet\n")
    venv = tmp_path / "venv"
    daemon = _daemon("uvmade", python, venv, req)
    made = envs.setup_daemon(daemon, log=lambda line: None, installer="uv")
    assert made.action == "created", made.message
    assert not (venv / "bin" / "pip").exists()

    monkeypatch.setenv("PATH", os.pathsep.join(
        d for d in os.environ["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(d, "uv"))))
    monkeypatch.setenv("MODELHOST_NO_UV", "1")  # uv also sits beside our interpreter
    assert envs._pick_installer() == "pip"
    req.write_text("# changed: setup must install again\n")
    updated = envs.setup_daemon(daemon, log=lambda line: None)
    assert updated.action == "updated", updated.message
    assert updated.message.endswith(", pip)")
    assert _in_venv(venv, "import pip, modelhost.daemons.runtime; print('ok')") == "ok"
    assert envs.setup_daemon(daemon, log=lambda line: None).action == "unchanged"


def test_venv_of_another_python_is_replaced(tmp_path):
    base = _need_python("3.12")
    _need_python("3.8")
    venv = tmp_path / "venv"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True)
    result = envs.setup_daemon(_daemon("switch", "3.8", venv), log=lambda line: None)
    assert result.action == "created", result.message
    assert _in_venv(venv, "import sys; print(sys.version_info[:2])") == "(3, 8)"


def test_failures_and_skips(tmp_path):
    lines = []
    bogus = envs.setup_daemon(_daemon("ghost", "3.99", tmp_path / "v"), log=lines.append)
    assert bogus.action == "failed"
    assert bogus.message.startswith("ghost: ") and "no python 3.99 found" in bogus.message
    assert not (tmp_path / "v").exists()

    skipped = envs.setup_daemon(_daemon("bare", "3.12", None), log=lines.append)
    assert skipped.action == "skipped"
    assert "(venv: false); nothing to set up" in skipped.message

    missing = envs.setup_daemon(_daemon("noreq", "3.12", tmp_path / "v2", tmp_path / "nope.txt"),
                                log=lines.append)
    assert missing.action == "failed" and "nope.txt not found" in missing.message

    # A directory that is not a venv is never deleted.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep me")
    refused = envs.setup_daemon(_daemon("typo", "3.12", precious), log=lines.append)
    assert refused.action == "failed" and "not a virtual environment" in refused.message
    assert (precious / "data").read_text() == "keep me"


def test_installer_failure_reports_command_and_tail(tmp_path):
    _need_python("3.12")
    req = tmp_path / "requirements.txt"
    req.write_text("this-package-does-not-exist-modelhost-test==0.0.1\n")
    venv = tmp_path / "bad"
    lines = []
    start = time.monotonic()
    result = envs.setup_daemon(_daemon("bad", "3.12", venv, req), log=lines.append)
    assert result.action == "failed"
    assert "install" in result.message and "exited with status" in result.message
    assert "this-package-does-not-exist" in result.message
    assert not (venv / envs.FINGERPRINT_FILE).exists()  # retried next time
    assert time.monotonic() - start < 300


def test_project_root_is_the_source_tree():
    root = envs.project_root()
    assert root is not None
    assert (root / "pyproject.toml").is_file() and (root / "client" / "__init__.py").is_file()


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_editable_install_on_py37(tmp_path, installer):
    # TalkingGaussian runs on 3.7: its editable install must build with both installers.
    _need_python("3.7")
    if installer == "uv" and envs._uv() is None:
        pytest.skip("uv is not installed")
    venv = tmp_path / f"venv37-{installer}"
    result = envs.setup_daemon(_daemon("tg", "3.7", venv), log=lambda line: None, installer=installer)
    assert result.action == "created", result.message
    where = _in_venv(venv, "import sys, modelhost.daemons.runtime as r; print(sys.version_info[:2], r.__file__)")
    assert where == f"(3, 7) {envs.project_root() / 'daemons' / 'runtime.py'}"
