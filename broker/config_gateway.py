"""The `gateway:` section: where the OpenAI-compatible gateway listens, its API keys,
and which daemon call each OpenAI model name stands for; and the spec its process
starts from.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node, SequenceNode

from modelhost.protocol import Priority

from .config_model import (
    DEFAULT_GATEWAY_LISTEN, GATEWAY_TASKS, MIN_API_KEY_CHARS, Config, ConfigError, DaemonConfig,
    GatewayConfig, GatewayModel, default_of,
)
from .config_sections import _is_loopback
from .config_yaml import _BAD, ENV_NAME, NodeReader, _join, _suggest

_GATEWAY_KEYS = ("listen", "api_keys", "api_keys_file", "api_keys_env", "timeout_s",
                 "max_input_chars", "max_upload", "pcm_rate", "models")
_GATEWAY_MODEL_KEYS = ("daemon", "task", "method", "voices", "speed", "arguments",
                       "instructions", "priority", "timeout_s")
_GATEWAY_SPEED_KEYS = ("argument", "scale", "min", "max")


class GatewaySections(NodeReader):
    """`gateway:` and its `models:`."""

    def gateway(self, entry: tuple[Node, Node], daemons: dict[str, DaemonConfig],
                daemons_entry: tuple[Node, Node] | None) -> GatewayConfig | None:
        knode, vnode = entry
        if self.scalar(vnode) is None:
            fields: dict[str, tuple[Node, Node]] = {}  # `gateway:` alone: every default
        else:
            fields = self.mapping(vnode, "gateway", _GATEWAY_KEYS)
            if fields is None:
                return None
        if daemons_entry is not None:
            for dknode, _ in (daemons_entry[1].value if isinstance(daemons_entry[1], MappingNode)
                              else ()):
                if self.scalar(dknode) == "gateway":
                    # `modelhost up` keeps each child's log as <name>.log and `modelhost
                    # logs NAME` finds it by name: one name, one process.
                    self.error(dknode, "daemons.gateway", "the name 'gateway' is the gateway's "
                               f"(section at line {knode.start_mark.line + 1}); rename the daemon")

        get = self.getter(fields, "gateway", GatewayConfig)

        host, port = get("listen", self.listen_address, DEFAULT_GATEWAY_LISTEN)
        keys: list[str] = []
        if "api_keys" in fields:
            keys += self.api_key_list(fields["api_keys"][1], "gateway.api_keys")
        if "api_keys_file" in fields:
            keys += self.api_key_file(fields["api_keys_file"][1], "gateway.api_keys_file")
        if "api_keys_env" in fields:
            keys += self.api_key_env(fields["api_keys_env"][1], "gateway.api_keys_env")
        key_given = any(k in fields for k in ("api_keys", "api_keys_file", "api_keys_env"))
        if not keys and not key_given and not _is_loopback(host):
            where = fields["listen"][1] if "listen" in fields else knode
            self.error(where, "gateway.listen", _gateway_keys_needed(host))
        pcm_rate = default_of(GatewayConfig, "pcm_rate")
        if "pcm_rate" in fields:
            node = fields["pcm_rate"][1]
            if self.scalar(node) is None:
                pcm_rate = None
            else:
                rate = self.integer(node, "gateway.pcm_rate", minimum=8000)
                pcm_rate = pcm_rate if rate is _BAD else rate
        models = None
        if "models" in fields:
            models = self.gateway_models(fields["models"][1], "gateway.models", daemons)
        return GatewayConfig(
            host=host, port=port, api_keys=tuple(dict.fromkeys(keys)),
            timeout_s=get("timeout_s", self.duration),
            max_input_chars=get("max_input_chars", self.integer, minimum=1),
            max_upload_bytes=get("max_upload", self.size, attr="max_upload_bytes"),
            pcm_rate=pcm_rate, models=models, line=knode.start_mark.line + 1)

    def gateway_models(self, node: Node, kp: str, daemons: dict[str, DaemonConfig]
                       ) -> dict[str, GatewayModel]:
        models = {}
        for name, (knode, vnode) in (self.mapping(node, kp, None) or {}).items():
            mkp = _join(kp, name)
            if not name.strip() or len(name) > 128:
                self.error(knode, mkp, "a model name is 1 to 128 characters")
                continue
            fields = self.mapping(vnode, mkp, _GATEWAY_MODEL_KEYS)
            if fields is None:
                continue
            missing = [key for key in ("daemon", "task") if key not in fields]
            for key in missing:
                self.error(knode, f"{mkp}.{key}", "required key is missing")

            get = self.getter(fields, mkp, GatewayModel)

            daemon = get("daemon", self.string, None)
            if daemon is not None and daemon not in daemons:
                self.error(fields["daemon"][1], f"{mkp}.daemon",
                           f"no daemon named {daemon!r} in this configuration (known: "
                           f"{', '.join(daemons) or 'none'})" + _suggest(daemon, daemons))
                daemon = None
            task = get("task", self.choice, None, choices=GATEWAY_TASKS)
            voices = None
            if "voices" in fields:
                voices = self.string_map(fields["voices"][1], f"{mkp}.voices")
            speed = None
            if "speed" in fields:
                speed = self.speed_mapping(fields["speed"][1], f"{mkp}.speed")
            values = dict(
                method=get("method", self.string),
                arguments=get("arguments", self.options),
                instructions=get("instructions", self.string),
                priority=get("priority", self.choice, choices=Priority.ALL),
                timeout_s=get("timeout_s", self.duration),
            )
            if missing or daemon is None or task is None or voices is _BAD or speed is _BAD:
                continue
            models[name] = GatewayModel(name=name, daemon=daemon, task=task, voices=voices,
                                        speed=speed, line=knode.start_mark.line + 1, **values)
        return models

    def string_map(self, node: Node, kp: str) -> Any:
        fields = self.mapping(node, kp, None)
        if fields is None:
            return _BAD
        out = {}
        for key, (_, vnode) in fields.items():
            value = self.string(vnode, _join(kp, key))
            if value is not _BAD:
                out[key] = value
        return out

    def speed_mapping(self, node: Node, kp: str) -> Any:
        fields = self.mapping(node, kp, _GATEWAY_SPEED_KEYS)
        if fields is None:
            return _BAD
        if "argument" not in fields:
            self.error(node, f"{kp}.argument", "required key is missing (the daemon's argument "
                                               "that OpenAI's speed becomes, e.g. rate)")
            return _BAD
        argument = self.field(fields, kp, "argument", self.string, None)
        numbers = {}
        for key in ("scale", "min", "max"):
            if key in fields:
                value = self.scalar(fields[key][1])
                if (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not math.isfinite(value) or (key == "scale" and value <= 0)):
                    self.error(fields[key][1], f"{kp}.{key}", "expected a "
                               + ("positive " if key == "scale" else "") + "number, got "
                               + self.describe(fields[key][1]))
                    return _BAD
                numbers[key] = value
        if "min" in numbers and "max" in numbers and numbers["min"] > numbers["max"]:
            self.error(fields["max"][1], f"{kp}.max", f"max ({numbers['max']}) is below min "
                                                      f"({numbers['min']})")
            return _BAD
        if argument is None:
            return _BAD
        return {"argument": argument, "scale": numbers.get("scale", 1.0),
                "min": numbers.get("min"), "max": numbers.get("max")}

    def listen_address(self, node: Node, kp: str) -> Any:
        """"HOST:PORT" for the gateway; any address, but beyond loopback only with keys."""
        value = self.scalar(node)
        if not isinstance(value, str):
            self.error(node, kp, f"expected \"HOST:PORT\", got {self.describe(node)}")
            return _BAD
        try:
            return parse_listen(value)
        except ValueError as e:
            self.error(node, kp, str(e))
            return _BAD

    def api_key_list(self, node: Node, kp: str) -> list[str]:
        if not isinstance(node, SequenceNode):
            self.error(node, kp, f"expected a list of keys, got {self.describe(node)}")
            return []
        keys = []
        for i, item in enumerate(node.value):
            key = self.scalar(item)
            problem = _api_key_problem(key)
            if problem:
                self.error(item, f"{kp}[{i}]", problem)
            else:
                keys.append(key)
        if not keys and not node.value:
            self.error(node, kp, "the list is empty; give at least one key or remove api_keys")
        return keys

    def api_key_file(self, node: Node, kp: str) -> list[str]:
        path = self.path_value(node, kp)
        if path is _BAD:
            return []
        try:
            mode = os.stat(path).st_mode
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            self.error(node, kp, f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
            return []
        if mode & 0o077:
            self.error(node, kp, f"{path} is open to group or others (mode {mode & 0o777:04o}); "
                                 f"a key file must be owner-only: chmod 600 {path}")
            return []
        keys = []
        for number, line in enumerate(text.splitlines(), 1):
            key = line.strip()
            if not key or key.startswith("#"):
                continue
            problem = _api_key_problem(key)
            if problem:
                # The file's line, never the key itself: this message may be logged.
                self.error(node, kp, f"{path}, line {number}: {problem}")
            else:
                keys.append(key)
        if not keys:
            self.error(node, kp, f"{path} holds no keys (one key a line; # starts a comment)")
        return keys

    def api_key_env(self, node: Node, kp: str) -> list[str]:
        name = self.string(node, kp)
        if name is _BAD:
            return []
        if not ENV_NAME.match(name):
            self.error(node, kp, f"{name!r} is not an environment variable name")
            return []
        text = os.environ.get(name, "")
        keys = [key for key in re.split(r"[\s,]+", text) if key]
        if not keys:
            self.error(node, kp, f"environment variable ${name} is not set or empty (keys "
                                 "separated by commas or spaces)")
            return []
        good = []
        for i, key in enumerate(keys):
            problem = _api_key_problem(key)
            if problem:
                self.error(node, kp, f"${name}, key {i + 1}: {problem}")
            else:
                good.append(key)
        return good


def parse_listen(value: str) -> tuple[str, int]:
    """(host, port) from "HOST:PORT" ("[::1]:8000" for IPv6); ValueError saying what is wrong."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with a port from 0 (any free port) to 65535, "
                         f"got {value!r}")
    host = host.strip("[]") if host.startswith("[") and host.endswith("]") else host
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (or localhost); the gateway binds "
                             "an address, e.g. 127.0.0.1, 0.0.0.0 or ::") from None
    return host, int(port)


def _gateway_keys_needed(host: str) -> str:
    return (f"{host!r} is not a loopback address: a gateway reachable from other hosts needs "
            "API keys (gateway.api_keys, api_keys_file or api_keys_env), which clients send "
            "as `Authorization: Bearer KEY`; or listen on 127.0.0.1")


def _api_key_problem(key: Any) -> str | None:
    if not isinstance(key, str):
        return f"expected a key (a string), got {type(key).__name__}"
    if len(key) < MIN_API_KEY_CHARS:
        return (f"a key must have at least {MIN_API_KEY_CHARS} characters (this one has "
                f"{len(key)}); make one with: python3 -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'")
    if any(c.isspace() for c in key) or not key.isprintable():
        return "a key must be printable characters without spaces"
    return None


def gateway_spec(config: Config, *, listen: str | None = None, address_file: str | None = None,
                 parent_pid: int | None = None) -> dict:
    """The JSON-able description the gateway process starts from (keys included: the
    supervisor writes it owner-only). `listen` overrides gateway.listen, under the same
    rule: beyond loopback only with keys. ConfigError when that rule is broken."""
    gateway = config.gateway or GatewayConfig()
    host, port = gateway.host, gateway.port
    if listen is not None:
        try:
            host, port = parse_listen(listen)
        except ValueError as e:
            raise ConfigError(f"--listen: {e}") from None
        if not gateway.api_keys and not _is_loopback(host):
            raise ConfigError(f"--listen: {_gateway_keys_needed(host)}")
    broker = config.broker
    models = None
    if gateway.models is not None:
        models = {name: {"daemon": m.daemon, "task": m.task, "method": m.method,
                         "voices": m.voices, "speed": m.speed, "arguments": m.arguments,
                         "instructions": m.instructions, "priority": m.priority,
                         "timeout_s": m.timeout_s}
                  for name, m in gateway.models.items()}
    curve = None
    if broker.curve is not None and broker.frontend.startswith("tcp://"):
        # On the broker's host the gateway connects as the broker, like its daemons.
        curve = {"server_key": str(broker.curve.secret_key),
                 "client_key": str(broker.curve.secret_key)}
    return {
        "host": host, "port": port,
        "endpoint": broker.frontend,
        "curve": curve,
        "api_keys": list(gateway.api_keys),
        "timeout_s": gateway.timeout_s,
        "max_input_chars": gateway.max_input_chars,
        "max_upload_bytes": gateway.max_upload_bytes,
        "pcm_rate": gateway.pcm_rate,
        "models": models,
        # What the embedded default mapping needs to pick daemons and their voices.
        "daemons": {name: {"engine": d.engine, "options": copy.deepcopy(d.options)}
                    for name, d in config.daemons.items()},
        "log_level": broker.log_level,
        "address_file": address_file,
        "parent_pid": parent_pid,
    }
