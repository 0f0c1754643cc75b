"""Render the systemd units of systemd/ from a configuration: `modelhost install-systemd`.

Under systemd, systemd is the supervisor: one unit for the broker (which then
spawns no daemon), a template unit with one instance per configured daemon,
each started with its own venv's interpreter, and modelhost.target to start
and stop them all. What differs per daemon (its interpreter, its spec, its
environment) goes into a drop-in of its instance, so the template stays one
file.

In this mode the broker stops a daemon's process to free memory by asking
systemd (`systemctl stop` of its instance, broker/systemd_daemons.py); a
system broker, which runs as the `modelhost` user, may do so through the
polkit rule rendered here.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
from pathlib import Path

from .config import Config, daemon_spec, load_config
from .envs import interpreter_for

UNITS = ("modelhost-broker.service", "modelhost-daemon@.service", "modelhost.target")
SERVICE_USER = "modelhost"
POLKIT_RULE = Path("/etc/polkit-1/rules.d/50-modelhost.rules")
DAEMON_UNIT_PREFIX = "modelhost-daemon@"
# What the broker asks systemd to do with a daemon's unit; nothing else is allowed.
POLKIT_VERBS = ("start", "stop", "restart")


def template_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "systemd"


def runtime_dir_for(user: bool) -> Path:
    """Where systemd puts RuntimeDirectory=modelhost: %t/modelhost."""
    if user:
        base = os.environ.get("XDG_RUNTIME_DIR") or "/run/user/{}".format(os.getuid())
        return Path(base) / "modelhost"
    return Path("/run/modelhost")


def load_for_systemd(config_path: str | None, user: bool) -> Config:
    """The configuration as the units will see it: runtime dir %t/modelhost."""
    previous = os.environ.get("MODELHOST_RUNTIME_DIR")
    os.environ["MODELHOST_RUNTIME_DIR"] = str(runtime_dir_for(user))
    try:
        return load_config(config_path)
    finally:
        if previous is None:
            del os.environ["MODELHOST_RUNTIME_DIR"]
        else:
            os.environ["MODELHOST_RUNTIME_DIR"] = previous


def render(config: Config, target_dir: Path, *, user: bool = False,
           python: str | None = None) -> dict[str, str]:
    """{relative path: text} of every file to write into `target_dir`.

    The daemons' spec files go under `target_dir`/modelhost/, next to the
    units that name them.
    """
    root = Path(__file__).resolve().parents[1]
    config_path = str(config.path) if config.path else str(root / "config" / "default.yaml")
    account = "" if user else "User={0}\nGroup={0}\n# The GPU's device nodes belong to these groups on most distributions.\n" \
        "SupplementaryGroups=video render".format(SERVICE_USER)
    values = {"{root}": str(root), "{python}": python or sys.executable,
              "{config}": config_path, "{state_dir}": str(config.broker.state_dir),
              "{account}": account, "{scope}": "user" if user else "system",
              "{wanted_by}": "default.target" if user else "multi-user.target",
              "{daemons}": " ".join("modelhost-daemon@{}.service".format(name)
                                    for name in config.daemons)}
    files = {}
    for unit in UNITS:
        text = (template_dir() / unit).read_text()
        for key, value in values.items():
            text = text.replace(key, value)
        files[unit] = text
    specs = target_dir / "modelhost"
    for name, daemon in config.daemons.items():
        spec_path = specs / (name + ".json")
        files["modelhost/{}.json".format(name)] = json.dumps(daemon_spec(config, name),
                                                             indent=2) + "\n"
        environment = "".join("Environment={}={}\n".format(key, _quote(value))
                              for key, value in sorted(daemon.env.items()))
        files["modelhost-daemon@{}.service.d/modelhost.conf".format(name)] = (
            "# {} ({}), rendered from {}\n[Service]\nExecStart=\n"
            "ExecStart={} -m modelhost.daemons.run {} --spec {}\n{}TimeoutStartSec={:.0f}\n"
            "TimeoutStopSec={:.0f}\n").format(
                name, daemon.engine, config_path, interpreter_for(daemon), name, spec_path,
                environment, daemon.ready_timeout_s, daemon.stop_timeout_s)
    return files


def polkit_rule(directory: Path | None = None) -> tuple[Path, str]:
    """(where, text) of the polkit rule that lets a system broker start and stop the daemons.

    The broker runs as `modelhost`, and systemd asks polkit whether an
    unprivileged user may manage a unit: this rule allows exactly the daemon
    units and exactly the verbs the broker uses. With `directory` (install-systemd
    --dir), it goes to `directory`/polkit-1/rules.d/ instead of /etc.
    """
    path = POLKIT_RULE if directory is None else \
        directory / "polkit-1" / "rules.d" / POLKIT_RULE.name
    verbs = ", ".join('"{}"'.format(verb) for verb in POLKIT_VERBS)
    text = """// modelhost: the broker (user {user}) starts and stops the model daemons' units
// (systemctl --no-block stop|start {prefix}NAME.service) to free GPU memory and
// have it back. Written by `modelhost install-systemd`.
polkit.addRule(function(action, subject) {{
    if (action.id !== "org.freedesktop.systemd1.manage-units" || subject.user !== "{user}") {{
        return polkit.Result.NOT_HANDLED;
    }}
    var unit = action.lookup("unit") || "";
    var verb = action.lookup("verb") || "";
    var prefix = "{prefix}", suffix = ".service";
    if (unit.length > prefix.length + suffix.length &&
            unit.indexOf(prefix) === 0 &&
            unit.indexOf(suffix, unit.length - suffix.length) !== -1 &&
            [{verbs}].indexOf(verb) !== -1) {{
        return polkit.Result.YES;
    }}
    return polkit.Result.NOT_HANDLED;
}});
""".format(user=SERVICE_USER, prefix=DAEMON_UNIT_PREFIX, verbs=verbs)
    return path, text


def _quote(value: str) -> str:
    return '"{}"'.format(value.replace("\\", "\\\\").replace('"', '\\"'))


def unit_dir(user: bool) -> Path:
    if user:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        return Path(base) / "systemd" / "user"
    return Path("/etc/systemd/system")


def service_user_exists() -> bool:
    try:
        pwd.getpwnam(SERVICE_USER)
        return True
    except KeyError:
        return False


