"""Load and validate the YAML configuration of the broker and its daemons.

The public face of the configuration: `load_config` and `parse_config` give a
frozen `Config` (its dataclasses are in config_model.py), `daemon_spec` and
`gateway_spec` what a daemon's or the gateway's process starts from. Every
problem in a file is reported with its file, line and key path, all in one
ConfigError (config_yaml.py); the sections are read in config_sections.py
(broker, daemons) and config_gateway.py (gateway).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from modelhost import _shm

from .config_gateway import GatewaySections, gateway_spec
from .config_model import (
    DEFAULT_MAX_MESSAGE, BrokerConfig, Config, ConfigError, CurveConfig, DaemonConfig,
    DeviceLimit, GatewayConfig, GatewayModel, MemoryConfig, RestartPolicy, ShmConfig,
    default_of, format_size, parse_size,
)
from .config_sections import HostSections
from .config_sections import _default_state_dir  # noqa: F401 (the tests read it here)

__all__ = [
    "ConfigError", "RestartPolicy", "DaemonConfig", "DeviceLimit", "MemoryConfig",
    "BrokerConfig", "CurveConfig", "GatewayConfig", "GatewayModel", "Config", "ShmConfig",
    "default_config_path", "load_config", "parse_config", "daemon_spec", "gateway_spec",
    "shm_dir",
    "parse_size", "format_size", "default_of", "DEFAULT_MAX_MESSAGE",
]


def default_config_path() -> Path:
    """The embedded default configuration, config/default.yaml of modelhost.config."""
    try:
        from importlib.resources import files

        return Path(str(files("modelhost.config") / "default.yaml"))
    except (ImportError, TypeError):
        # Running from a checkout that is not installed: the file sits beside us.
        return Path(__file__).resolve().parents[1] / "config" / "default.yaml"


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a configuration file (the embedded default when path is None)."""
    path = default_config_path() if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from None
    return parse_config(text, path)


def parse_config(text: str, path: Path | None = None) -> Config:
    """Validate configuration text; `path` names it in errors and anchors relative paths."""
    path = None if path is None else Path(path)
    return _Parser(path).parse(text)


def daemon_spec(config: Config, name: str, *, parent_pid: int | None = None) -> dict:
    """The JSON-able description the daemon runtime starts from."""
    try:
        daemon = config.daemons[name]
    except KeyError:
        known = ", ".join(config.daemons) or "none"
        raise KeyError(f"no daemon {name!r} in the configuration (known: {known})") from None
    return {
        "name": daemon.name,
        "engine": daemon.engine,
        # A copy: the runtime (or a caller) may mutate the spec, the config stays as loaded.
        "options": copy.deepcopy(daemon.options),
        "backend": config.broker.backend,
        "heartbeat_s": config.broker.heartbeat_s,
        "liveness": config.broker.liveness,
        "concurrency": daemon.concurrency,
        "max_reply_bytes": config.broker.max_reply_bytes,
        "pythonpath": [str(p) for p in daemon.pythonpath],
        "log_level": config.broker.log_level,
        "parent_pid": parent_pid,
        "shm": {"dir": str(shm_dir(config.broker)), "threshold": config.broker.shm.threshold,
                "max_total": config.broker.shm.max_total},
        **_curve_spec(config.broker),
    }


def shm_dir(broker: BrokerConfig) -> Path:
    """Where the segments of this broker's clients and daemons live."""
    return broker.shm.dir or Path(_shm.default_dir(str(broker.runtime_dir)))


def _curve_spec(broker: BrokerConfig) -> dict:
    """How a daemon on this host connects to a CURVE backend: as the broker itself.

    The broker's own key pair is always authorized, so the processes of the
    host that can read its secret key (daemons, the supervisor) need no keys
    of their own. A daemon on another host gets a spec with its own pair.
    """
    if broker.curve is None or not broker.backend.startswith("tcp://"):
        return {}
    key = str(broker.curve.secret_key)
    return {"curve": {"server_key": key, "client_key": key}}


class _Parser(HostSections, GatewaySections):
    """The whole file: its top-level sections, each read by its own section reader."""

    def parse(self, text: str) -> Config:
        root = self.compose(text)
        if root is None:
            self.error(1, "", "the configuration is empty; expected a mapping with a 'daemons' section")
            self._raise()
        # `chat:` is the chat loop's section (modelhost.pipelines.chat, `modelhost chat
        # --config F`): a client's settings, checked by the chat itself, never read here;
        # `cluster:` the cluster mode's (modelhost.cluster.settings), likewise.
        top = self.mapping(root, "", ("broker", "daemons", "gateway", "chat", "cluster"))
        if top is None:
            self._raise()

        broker = self.broker(top.get("broker"))
        daemons: dict[str, DaemonConfig] = {}
        if "daemons" not in top:
            self.error(root, "daemons", "required section is missing")
        else:
            _, dnode = top["daemons"]
            entries = self.mapping(dnode, "daemons", None)
            for name, (knode, vnode) in (entries or {}).items():
                daemon = self.daemon(name, knode, vnode, broker)
                if daemon is not None:
                    daemons[name] = daemon
        gateway = None
        if "gateway" in top:
            gateway = self.gateway(top["gateway"], daemons, top.get("daemons"))
        self._raise()
        return Config(path=Path(os.path.abspath(self.path)) if self.path else None,
                      broker=broker, daemons=daemons, gateway=gateway)
