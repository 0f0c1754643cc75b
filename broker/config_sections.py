"""The broker's and the daemons' sections of the configuration file.

`HostSections` reads `broker:` (endpoints, memory thresholds, CURVE keys, the
metrics server) and each daemon under `daemons:` into the dataclasses of
config_model.py, with the line of every problem (config_yaml.NodeReader).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node

from modelhost.local import default_runtime_dir
from modelhost.protocol import Priority

from .config_model import (
    PYTHON_VERSION, BrokerConfig, CurveConfig, DaemonConfig, DeviceLimit, MemoryConfig,
    RestartPolicy, ShmConfig, default_of, parse_size,
)
from .config_yaml import _BAD, _FLOAT, NodeReader, _join, _suggest

LOG_LEVELS = ("debug", "info", "warning", "error")
PROBES = ("auto", "nvml", "host")
EXTERNAL_POLICIES = ("count", "ignore")
DEVICE_ID = re.compile(r"^(gpu[0-9]+|host)$")
DAEMON_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
ENGINE_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
# The longest ipc path libzmq accepts: sockaddr_un.sun_path is 108 bytes with its NUL.
_MAX_IPC_PATH = 107

_BROKER_KEYS = ("runtime_dir", "state_dir", "frontend", "backend", "events", "http", "curve",
                "heartbeat_s", "liveness", "client_liveness_s", "max_payload", "max_reply",
                "log_level", "memory", "shm")
_SHM_KEYS = ("threshold", "max_total", "dir")

_MEMORY_KEYS = ("probe", "threshold", "external", "devices", "sample_s", "aging_s",
                "max_skips", "priority_window_s")
_DEVICE_KEYS = ("threshold", "external")
_DAEMON_KEYS = ("engine", "python", "venv", "requirements", "options", "pythonpath", "env",
                "concurrency", "max_queue", "max_payload", "ready_timeout_s",
                "stop_timeout_s", "restart", "autostart", "memory", "device", "pin",
                "idle_ttl_s", "preload", "priority")
_FOOTPRINT_KEYS = ("resident", "peak")
_CURVE_KEYS = ("secret_key", "authorized_keys")
_RESTART_KEYS = ("backoff_s", "max_backoff_s", "reset_after_s")


class HostSections(NodeReader):
    """`broker:` and each daemon of `daemons:`."""

    # -- sections

    def broker(self, entry: tuple[Node, Node] | None) -> BrokerConfig:
        fields: dict[str, tuple[Node, Node]] = {}
        if entry is not None:
            fields = self.mapping(entry[1], "broker", _BROKER_KEYS) or {}

        get = self.getter(fields, "broker", BrokerConfig)

        runtime_dir = get("runtime_dir", self.path_value, None) or _absolute(default_runtime_dir())
        state_dir = get("state_dir", self.path_value, None) or _default_state_dir()
        curve = get("curve", self.curve)
        endpoints = {}
        for key in ("frontend", "backend", "events"):
            default = f"ipc://{{runtime_dir}}/{key}.sock"
            node = fields[key][1] if key in fields else None
            template = get(key, self.string, default)
            endpoints[key] = self.endpoint(template, node, f"broker.{key}", runtime_dir,
                                           state_dir, entry, fields, curve="curve" in fields)
        # All three are bound by the broker; one address cannot be bound twice.
        for first, second in (("frontend", "backend"), ("frontend", "events"),
                              ("backend", "events")):
            if endpoints[first] == endpoints[second]:
                key = second if second in fields else first
                self.error(fields[key][1] if key in fields else 1, f"broker.{key}",
                           f"{first} and {second} are the same endpoint ({endpoints[first]})")

        level = get("log_level", self.string)
        if isinstance(level, str) and level.lower() not in LOG_LEVELS:
            self.error(fields["log_level"][1], "broker.log_level",
                       f"expected one of {', '.join(LOG_LEVELS)}, got {level!r}"
                       + _suggest(level.lower(), LOG_LEVELS))
            level = default_of(BrokerConfig, "log_level")

        return BrokerConfig(
            runtime_dir=runtime_dir,
            state_dir=state_dir,
            frontend=endpoints["frontend"],
            backend=endpoints["backend"],
            heartbeat_s=get("heartbeat_s", self.duration),
            liveness=get("liveness", self.integer, minimum=1),
            client_liveness_s=get("client_liveness_s", self.duration),
            max_payload_bytes=get("max_payload", self.size, attr="max_payload_bytes"),
            max_reply_bytes=get("max_reply", self.size, attr="max_reply_bytes"),
            log_level=level.lower(),
            memory=get("memory", self.memory),
            events=endpoints["events"],
            http=get("http", self.http_address),
            curve=curve,
            shm=get("shm", self.shm),
        )

    def shm(self, node: Node, kp: str) -> Any:
        fields = self.mapping(node, kp, _SHM_KEYS)
        if fields is None:
            return _BAD
        get = self.getter(fields, kp, ShmConfig)
        threshold = default_of(ShmConfig, "threshold")
        if "threshold" in fields:
            value = self.scalar(fields["threshold"][1])
            # `off` is YAML's false.
            threshold = None if value is None or value is False or value == "off" else \
                get("threshold", self.size)
        return ShmConfig(threshold=threshold, max_total=get("max_total", self.size),
                         dir=get("dir", self.path_value))

    def memory(self, node: Node, kp: str) -> Any:
        fields = self.mapping(node, kp, _MEMORY_KEYS)
        if fields is None:
            return _BAD

        get = self.getter(fields, kp, MemoryConfig)
        probe = get("probe", self.choice, choices=PROBES)
        default = DeviceLimit()
        threshold = get("threshold", self.threshold, None)
        if threshold is not None:
            default = _with_threshold(default, threshold)
        default = replace(default, external=get("external", self.choice, default.external,
                                                choices=EXTERNAL_POLICIES))
        devices = {}
        if "devices" in fields:
            devices = self.device_limits(fields["devices"][1], f"{kp}.devices", default)
        return MemoryConfig(
            probe=probe,
            default=default,
            devices=devices,
            sample_s=get("sample_s", self.duration),
            aging_s=get("aging_s", self.duration),
            max_skips=get("max_skips", self.integer, minimum=0),
            priority_window_s=get("priority_window_s", self.duration, allow_zero=True),
        )

    def device_limits(self, node: Node, kp: str, default: DeviceLimit) -> dict[str, DeviceLimit]:
        """Per-device overrides: a mapping {threshold, external}, or just a threshold.

        What an override leaves out comes from the section's defaults.
        """
        entries = self.mapping(node, kp, None) or {}
        limits = {}
        for device_id, (knode, vnode) in entries.items():
            dkp = _join(kp, device_id)
            if not DEVICE_ID.match(device_id):
                self.error(knode, dkp, "unknown device id: expected gpu0, gpu1, ... (as the "
                                       "NVML probe numbers them) or host")
                continue
            if isinstance(vnode, MappingNode):
                fields = self.mapping(vnode, dkp, _DEVICE_KEYS) or {}
                limit = default
                threshold = self.field(fields, dkp, "threshold", self.threshold, None)
                if threshold is not None:
                    limit = _with_threshold(limit, threshold)
                external = self.field(fields, dkp, "external", self.choice, default.external,
                                      choices=EXTERNAL_POLICIES)
                limits[device_id] = replace(limit, external=external)
            else:
                threshold = self.threshold(vnode, dkp)
                if threshold is not _BAD:
                    limits[device_id] = _with_threshold(default, threshold)
        return limits

    def daemon(self, name: str, knode: Node, vnode: Node, broker: BrokerConfig) -> DaemonConfig | None:
        kp = f"daemons.{name}"
        name_ok = bool(DAEMON_NAME.match(name))
        if not name_ok:
            self.error(knode, kp, "invalid daemon name: names are 1 to 40 characters of "
                                  "lowercase letters, digits, '_' and '-', starting with a letter")
        fields = self.mapping(vnode, kp, _DAEMON_KEYS)
        if fields is None:
            return None
        missing = False
        for required in ("engine", "python"):
            if required not in fields:
                self.error(knode, f"{kp}.{required}", "required key is missing")
                missing = True

        get = self.getter(fields, kp, DaemonConfig)
        engine = get("engine", self.string, None)
        if engine is not None and not ENGINE_REF.match(engine):
            self.error(fields["engine"][1], f"{kp}.engine",
                       f"expected 'package.module:ClassName', got {engine!r}")
        python = get("python", self.python, None)

        venv: Path | None = broker.state_dir / "venvs" / name
        if "venv" in fields:
            node = fields["venv"][1]
            if self.scalar(node) is False:
                venv = None
            else:
                venv = self.path_value(node, f"{kp}.venv", what="a path or false")
                if venv is _BAD:
                    venv = None

        max_payload = get("max_payload", self.size, attr="max_payload_bytes")
        if max_payload is not None and max_payload > broker.max_payload_bytes:
            # The broker refuses larger messages before the daemon could see them.
            self.error(fields["max_payload"][1], f"{kp}.max_payload",
                       f"{max_payload} bytes exceeds broker.max_payload "
                       f"({broker.max_payload_bytes} bytes)")

        restart = RestartPolicy()
        if "restart" in fields:
            restart = self.restart(fields["restart"][1], f"{kp}.restart")

        footprint: dict[str, int | None] = {}
        if "memory" in fields:
            footprint = self.footprint(fields["memory"][1], f"{kp}.memory")
        pin = get("pin", self.boolean)
        idle_ttl_s = get("idle_ttl_s", self.duration, allow_null=True)
        if pin and idle_ttl_s is not None:
            self.error(fields["idle_ttl_s"][1], f"{kp}.idle_ttl_s",
                       f"a pinned daemon is never unloaded (pin: true at line "
                       f"{fields['pin'][1].start_mark.line + 1}), so an idle TTL cannot apply; "
                       "remove one of the two")

        # Convert every field before deciding whether the daemon is usable, so
        # that all its errors are reported in one pass.
        values = dict(
            requirements=get("requirements", self.path_value),
            options=get("options", self.options),
            pythonpath=tuple(get("pythonpath", self.path_list)),
            env=get("env", self.environment),
            concurrency=get("concurrency", self.integer, minimum=1),
            max_queue=get("max_queue", self.integer, minimum=0),
            ready_timeout_s=get("ready_timeout_s", self.duration),
            stop_timeout_s=get("stop_timeout_s", self.duration),
            autostart=get("autostart", self.boolean),
            declared_resident=footprint.get("resident"),
            declared_peak=footprint.get("peak"),
            device=get("device", self.device_id),
            pin=pin,
            idle_ttl_s=idle_ttl_s,
            preload=get("preload", self.boolean),
            priority=get("priority", self.choice, choices=Priority.ALL),
        )
        if missing or not name_ok or engine is None or python is None:
            return None
        return DaemonConfig(name=name, engine=engine, python=python, venv=venv,
                            max_payload_bytes=max_payload, restart=restart,
                            line=knode.start_mark.line + 1, **values)

    def footprint(self, node: Node, kp: str) -> dict[str, int | None]:
        fields = self.mapping(node, kp, _FOOTPRINT_KEYS) or {}
        # 0 is a real footprint: a daemon that holds nothing on the device, or
        # whose calls need nothing beyond its weights.
        return {key: self.field(fields, kp, key, self.size, None, allow_zero=True)
                for key in _FOOTPRINT_KEYS}

    def restart(self, node: Node, kp: str) -> RestartPolicy:
        fields = self.mapping(node, kp, _RESTART_KEYS) or {}
        policy = RestartPolicy(**{
            key: self.field(fields, kp, key, self.duration, default_of(RestartPolicy, key))
            for key in _RESTART_KEYS})
        if policy.max_backoff_s < policy.backoff_s:
            key = "max_backoff_s" if "max_backoff_s" in fields else "backoff_s"
            self.error(fields[key][1], f"{kp}.{key}",
                       f"max_backoff_s ({policy.max_backoff_s}) is below backoff_s "
                       f"({policy.backoff_s})")
        return policy

    # -- value converters

    def http_address(self, node: Node, kp: str) -> Any:
        """"HOST:PORT" on loopback; null turns the server off."""
        value = self.scalar(node)
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(node, kp, f"expected \"HOST:PORT\" or null, got {self.describe(node)}")
            return _BAD
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            self.error(node, kp, f"expected HOST:PORT with a port from 0 (any free port) to "
                                 f"65535, got {value!r}")
            return _BAD
        if not _is_loopback(host):
            # Metrics and the dashboard have no authentication: expose them
            # beyond this host through a proxy that has some.
            self.error(node, kp, f"{host!r} is not a loopback address; the metrics and "
                                 "dashboard server listens on loopback only (127.0.0.1 or "
                                 "[::1]); put a reverse proxy in front to reach it remotely")
            return _BAD
        return host.strip("[]"), int(port)

    def curve(self, node: Node, kp: str) -> Any:
        fields = self.mapping(node, kp, _CURVE_KEYS)
        if fields is None:
            return _BAD
        for required in _CURVE_KEYS:
            if required not in fields:
                self.error(node, f"{kp}.{required}", "required key is missing (make a key "
                                                     "pair with `modelhost keys broker`)")
        secret = self.field(fields, kp, "secret_key", self.secret_key_file, None)
        authorized = self.field(fields, kp, "authorized_keys", self.key_directory, None)
        if secret is None or authorized is None:
            return _BAD
        return CurveConfig(secret_key=secret, authorized_keys=authorized)

    def secret_key_file(self, node: Node, kp: str) -> Any:
        path = self.path_value(node, kp)
        if path is _BAD:
            return _BAD
        import zmq.auth

        try:
            mode = os.stat(path).st_mode
            _, secret = zmq.auth.load_certificate(str(path))
        except OSError as e:
            self.error(node, kp, f"cannot read {path}: {e.strerror or e}; make the broker's "
                                 "key pair with `modelhost keys broker`")
            return _BAD
        except ValueError:
            self.error(node, kp, f"{path} is not a CURVE certificate; use the NAME.key_secret "
                                 "that `modelhost keys` writes")
            return _BAD
        if secret is None:
            self.error(node, kp, f"{path} holds only a public key; use the NAME.key_secret "
                                 "beside it")
            return _BAD
        if mode & 0o077:
            self.error(node, kp, f"{path} is open to group or others (mode {mode & 0o777:04o}); "
                                 f"a secret key must be owner-only: chmod 600 {path}")
            return _BAD
        return path

    def key_directory(self, node: Node, kp: str) -> Any:
        path = self.path_value(node, kp)
        if path is _BAD:
            return _BAD
        if not path.is_dir():
            self.error(node, kp, f"{path} is not a directory; create it and copy there the "
                                 "public NAME.key of each client to let in")
            return _BAD
        return path

    def device_id(self, node: Node, kp: str) -> Any:
        value = self.scalar(node)
        if not isinstance(value, str) or not DEVICE_ID.match(value):
            self.error(node, kp, "expected a device id: gpu0, gpu1, ... (as the NVML probe "
                                 f"numbers them) or host, got {self.describe(node)}")
            return _BAD
        return value

    def threshold(self, node: Node, kp: str) -> Any:
        """("fraction", f) or ("bytes", n), from 0.9, 1, "90%", "70GiB" or 75161927680.

        A number up to 100 is a fraction, never a count of bytes: `threshold: 90`
        surely means 90%, which is an error that says how to write it.
        """
        value = self.scalar(node)
        expected = ("expected a fraction of the device's memory in (0, 1] like 0.9, "
                    "or a size like \"70GiB\"")
        if isinstance(value, str):
            text = value.strip()
            if text.endswith("%"):
                return self.percentage(node, kp, text[:-1])
            if re.fullmatch(r"[+-]?\d+", text):
                value = int(text)
            else:
                try:
                    value = float(text)  # "0.9" quoted is still a fraction
                except ValueError:
                    pass
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            self.error(node, kp, f"{expected}, got {self.describe(node)}")
            return _BAD
        if isinstance(value, float) or (isinstance(value, int) and value <= 100):
            if math.isfinite(value) and 0 < value <= 1:
                return ("fraction", float(value))
            hint = ""
            if math.isfinite(value) and 1 < value <= 100:
                hint = f"; for {value:g}% write {value / 100:g} or \"{value:g}%\""
            self.error(node, kp, f"{expected}, got {self.describe(node)}{hint}")
            return _BAD
        try:
            size = parse_size(value)
        except ValueError:
            self.error(node, kp, f"{expected}, got {self.describe(node)}")
            return _BAD
        if size <= 0:
            self.error(node, kp, f"expected a positive size, got {self.describe(node)}")
            return _BAD
        return ("bytes", size)

    def percentage(self, node: Node, kp: str, number: str) -> Any:
        try:
            percent = float(number)
        except ValueError:
            percent = math.nan
        if not 0 < percent <= 100:  # false for nan too
            self.error(node, kp, "expected a percentage above 0% and up to 100%, "
                                 f"got {self.describe(node)}")
            return _BAD
        return ("fraction", percent / 100)

    def python(self, node: Node, kp: str) -> Any:
        value = self.scalar(node)
        if node.tag == _FLOAT:
            # `python: 3.10` is the float 3.1 to YAML: the classic trap.
            hint = f" (YAML reads {node.value} as {value!r})" if str(value) != node.value else ""
            self.error(node, kp, f"expected a version string, got the number {node.value}{hint}; "
                                 f"quote it: python: \"{node.value}\"")
            return _BAD
        if not isinstance(value, str):
            self.error(node, kp, f"expected a version like \"3.12\" or an interpreter path, "
                                 f"got {self.describe(node)}")
            return _BAD
        if "/" in value:
            expanded = self.expand(value, node, kp)
            return _BAD if expanded is _BAD else str(self.resolve(expanded))
        if not PYTHON_VERSION.match(value):
            self.error(node, kp, f"expected a version like \"3.12\" or \"3.8.18\", or an "
                                 f"interpreter path, got {value!r}")
            return _BAD
        return value

    def endpoint(self, template: str, node: Node | None, kp: str, runtime_dir: Path,
                 state_dir: Path, section: tuple[Node, Node] | None,
                 fields: dict[str, tuple[Node, Node]], curve: bool = False) -> str:
        endpoint = (template.replace("{runtime_dir}", str(runtime_dir))
                    .replace("{state_dir}", str(state_dir)))
        problem = _endpoint_problem(endpoint, curve)
        if problem:
            # A default endpoint can go wrong only through runtime_dir: point there.
            where = node or (fields.get("runtime_dir") or section or (None, 1))[1]
            self.error(where, kp, problem)
        return endpoint


def _with_threshold(limit: DeviceLimit, threshold: tuple[str, float | int]) -> DeviceLimit:
    kind, value = threshold
    if kind == "fraction":
        return replace(limit, threshold_fraction=value, threshold_bytes=None)
    return replace(limit, threshold_fraction=None, threshold_bytes=value)


def _absolute(path: str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


def _default_state_dir() -> Path:
    explicit = os.environ.get("MODELHOST_STATE_DIR")
    if explicit:
        return _absolute(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return _absolute(os.path.join(xdg, "modelhost"))
    return _absolute("~/.local/state/modelhost")


def _endpoint_problem(endpoint: str, curve: bool = False) -> str | None:
    """Why a ZeroMQ endpoint cannot be used, or None (`curve`: broker.curve is configured)."""
    leftover = re.search(r"\{[^}]*\}", endpoint)
    if leftover:
        return (f"unknown placeholder {leftover.group(0)} in {endpoint!r}; "
                "known: {runtime_dir}, {state_dir}")
    if endpoint.startswith("ipc://"):
        sock = endpoint[len("ipc://"):]
        if not sock:
            return f"ipc endpoint {endpoint!r} has no path"
        if len(sock.encode()) > _MAX_IPC_PATH:
            return (f"ipc path {sock!r} is {len(sock.encode())} bytes, longer than the "
                    f"{_MAX_IPC_PATH} a unix socket allows; choose a shorter runtime_dir")
        return None
    if endpoint.startswith("inproc://"):
        return None if endpoint[len("inproc://"):] else f"inproc endpoint {endpoint!r} has no name"
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://"):].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"expected tcp://HOST:PORT with a port from 1 to 65535, got {endpoint!r}"
        if not curve and not _is_loopback(host):
            return (f"{endpoint!r} is not on loopback: non-loopback tcp needs CURVE "
                    "authentication, which is not configured here; set broker.curve "
                    "(secret_key, authorized_keys: see `modelhost keys`), or use ipc:// "
                    "or 127.0.0.1")
        return None
    return f"expected an endpoint starting with ipc://, tcp:// or inproc://, got {endpoint!r}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # interface names, "*", other host names
