"""Load and validate the YAML configuration of the broker and its daemons.

The file is composed into a YAML node tree rather than loaded into plain
objects, so that every key and value keeps the line it came from: an error
names the file, the line and the dotted key path, e.g.

    config.yaml:12: daemons.espeak.concurrency: expected a positive integer, got 'two'

Validation collects every problem and raises one ConfigError listing them
all, so a user fixes a file in one pass instead of one error per restart.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from modelhost.local import default_runtime_dir
from modelhost.protocol import Priority

__all__ = [
    "ConfigError", "RestartPolicy", "DaemonConfig", "DeviceLimit", "MemoryConfig",
    "BrokerConfig", "CurveConfig", "GatewayConfig", "GatewayModel", "Config",
    "default_config_path", "load_config", "parse_config", "daemon_spec", "gateway_spec",
    "interpreter_for", "find_base_interpreter", "parse_size", "format_size",
]


class ConfigError(Exception):
    """A configuration that cannot be used; `.errors` holds one message per problem."""

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0  # first delay before restarting a crashed daemon
    max_backoff_s: float = 60.0  # cap of the exponential backoff
    reset_after_s: float = 60.0  # a daemon up this long has its backoff reset


@dataclass(frozen=True)
class DaemonConfig:
    name: str
    engine: str  # "package.module:ClassName"
    python: str  # a version like "3.12" / "3.8.18", or an absolute interpreter path
    venv: Path | None = None  # None: run `python` directly, no venv
    requirements: Path | None = None  # pip requirements file of this daemon
    options: dict = field(default_factory=dict)  # engine constructor keyword arguments
    pythonpath: tuple[Path, ...] = ()  # extra sys.path entries for the daemon
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables
    concurrency: int = 1  # calls run at once
    max_queue: int = 64  # queued calls beyond which new calls get over_capacity
    max_payload_bytes: int | None = None  # None: the broker's limit
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 10.0
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    autostart: bool = True
    # The footprint the file declares, until the broker has measured one: the
    # bytes its weights hold when resident, and the extra a call needs at its
    # peak. None: not declared.
    declared_resident: int | None = None
    declared_peak: int | None = None
    device: str | None = None  # where its memory lives; None: the probe's first device
    pin: bool = False  # never evicted (nor unloaded when idle)
    idle_ttl_s: float | None = None  # unloaded after this long idle; None: never
    preload: bool = True  # loaded once its process is up, if that evicts nothing
    # The most urgent class of work it serves, known before it has served any:
    # a request less urgent than this may not evict it. None: learned from
    # the work it serves.
    priority: str | None = None
    line: int = 0  # line of the daemon's section, for later messages


@dataclass(frozen=True)
class DeviceLimit:
    """How much of one device the broker may commit, and what counts against it.

    Exactly one of threshold_fraction and threshold_bytes is set.
    """

    threshold_fraction: float | None = 0.9  # of the device's total, in (0, 1]
    threshold_bytes: int | None = None  # an absolute size
    # "count": memory held by processes other than modelhost's daemons takes
    # room from the threshold; "ignore": only the daemons' memory is counted.
    external: str = "count"

    def budget(self, total: int) -> int:
        """The bytes the broker may commit on a device of `total` bytes.

        A fraction is floored to whole bytes. A size is returned as written,
        even above `total`: the device's own capacity, as the probe reads it,
        still bounds what fits.
        """
        if self.threshold_bytes is not None:
            return self.threshold_bytes
        return int(math.floor(self.threshold_fraction * total))

    def describe(self, total: int | None = None) -> str:
        """The threshold for people: "90% of 79.6 GiB", "90%" without a total, "2.0 GiB"."""
        if self.threshold_bytes is not None:
            return format_size(self.threshold_bytes)
        percent = f"{round(self.threshold_fraction * 100, 2):g}%"
        return percent if total is None else f"{percent} of {format_size(total)}"


@dataclass(frozen=True)
class MemoryConfig:
    probe: str = "auto"  # auto | nvml | host
    default: DeviceLimit = field(default_factory=DeviceLimit)  # for devices not in `devices`
    devices: dict[str, DeviceLimit] = field(default_factory=dict)  # "gpu0", "host" -> limit
    sample_s: float = 0.2  # probe period while calls run, to catch their peaks
    aging_s: float = 30.0  # a waiting call rises one priority class per aging_s
    # Times calls for resident daemons may overtake a call that waits for
    # memory, so that a big load is not starved by a stream of small calls.
    max_skips: int = 4
    # A daemon ranks, for eviction, with the highest priority class it served
    # within this window.
    priority_window_s: float = 60.0

    def limit_for(self, device_id: str) -> DeviceLimit:
        return self.devices.get(device_id, self.default)


# Where the metrics and dashboard server listens unless configured.
DEFAULT_HTTP = ("127.0.0.1", 9466)


@dataclass(frozen=True)
class CurveConfig:
    """CURVE on every tcp:// endpoint the broker binds (ipc:// stays plain)."""

    secret_key: Path  # the broker's NAME.key_secret (from `modelhost keys`)
    authorized_keys: Path  # a directory of the public NAME.key files of allowed clients


@dataclass(frozen=True)
class BrokerConfig:
    runtime_dir: Path  # ipc sockets and daemon spec files
    state_dir: Path  # venvs and remembered state
    frontend: str  # client endpoint
    backend: str  # daemon endpoint
    events: str  # where state changes, moves, requests and errors are published (PUB)
    heartbeat_s: float = 1.0
    liveness: int = 3
    client_liveness_s: float = 10.0
    max_payload_bytes: int = 256 * 2**20
    # The largest frame a daemon may send (a result's payload): the backend
    # socket refuses more, so no peer there can make the broker buffer
    # gigabytes; the daemon runtime answers payload_too_large instead.
    max_reply_bytes: int = 256 * 2**20
    log_level: str = "info"  # debug|info|warning|error
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # (host, port) of the metrics and dashboard server, loopback only; port 0
    # takes any free port; None: no HTTP server.
    http: tuple[str, int] | None = DEFAULT_HTTP
    # None: no CURVE, and then tcp:// only on loopback.
    curve: CurveConfig | None = None


# Where the OpenAI-compatible gateway listens unless configured (loopback: no keys needed).
DEFAULT_GATEWAY_LISTEN = ("127.0.0.1", 8000)
GATEWAY_TASKS = ("speech", "transcription")
# What the OpenAI API itself allows: 4096 characters of input, 25 MB uploads.
DEFAULT_GATEWAY_MAX_INPUT_CHARS = 4096
DEFAULT_GATEWAY_MAX_UPLOAD = 25 * 2**20
# Shorter keys are too easy to guess for something that guards a GPU box.
MIN_API_KEY_CHARS = 16


@dataclass(frozen=True)
class GatewayModel:
    """An OpenAI model name and the daemon call it stands for."""

    name: str  # what clients send as `model`, e.g. "tts-1"
    daemon: str  # the daemon that serves it
    task: str  # "speech" (/v1/audio/speech) or "transcription" (/v1/audio/transcriptions)
    method: str | None = None  # None: tts for speech, transcribe for transcription
    # OpenAI voice name -> the daemon's voice; None: the default for the daemon's
    # engine (espeak: alloy, echo, ... -> espeak voices; others: names pass through).
    voices: dict[str, str] | None = None
    # How OpenAI's `speed` (0.25 .. 4) reaches the daemon: {"argument", "scale", "min",
    # "max"}; None: the default for the daemon's engine.
    speed: dict | None = None
    arguments: dict = field(default_factory=dict)  # fixed extra arguments of every call
    instructions: str | None = None  # the argument OpenAI's `instructions` goes to; None: dropped
    priority: str | None = None  # None: interactive for speech, normal for transcription
    timeout_s: float | None = None  # None: gateway.timeout_s
    line: int = 0


@dataclass(frozen=True)
class GatewayConfig:
    """The OpenAI-compatible HTTP gateway (modelhost.gateway), a client of the broker."""

    host: str = DEFAULT_GATEWAY_LISTEN[0]
    port: int = DEFAULT_GATEWAY_LISTEN[1]  # 0: any free port (written to its address file)
    # Bearer keys a request must carry; empty: no authentication, allowed on loopback only.
    api_keys: tuple[str, ...] = ()
    timeout_s: float = 600.0  # the broker's deadline for each call made for a request
    max_input_chars: int = DEFAULT_GATEWAY_MAX_INPUT_CHARS
    max_upload_bytes: int = DEFAULT_GATEWAY_MAX_UPLOAD  # a bigger upload is refused with 413
    # The rate of response_format "pcm" (OpenAI's is 24 kHz); None: the daemon's own rate.
    pcm_rate: int | None = 24000
    models: dict[str, GatewayModel] | None = None  # None: the gateway's embedded default mapping
    line: int = 0


@dataclass(frozen=True)
class Config:
    path: Path | None  # the file it came from
    broker: BrokerConfig
    daemons: dict[str, DaemonConfig]  # in file order
    # None: no gateway section, so `modelhost up` starts none (`modelhost gateway`
    # still runs one with the defaults).
    gateway: GatewayConfig | None = None


LOG_LEVELS = ("debug", "info", "warning", "error")
PROBES = ("auto", "nvml", "host")
EXTERNAL_POLICIES = ("count", "ignore")
DEVICE_ID = re.compile(r"^(gpu[0-9]+|host)$")
DAEMON_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
ENGINE_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
PYTHON_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "m": 2**20, "g": 2**30,  # bare letters: what `ulimit` and friends mean
    "ki": 2**10, "mi": 2**20, "gi": 2**30,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
}
_ENV_REF = re.compile(r"\$(?:\{([^}]*)\}|(\w+))")
# The longest ipc path libzmq accepts: sockaddr_un.sun_path is 108 bytes with its NUL.
_MAX_IPC_PATH = 107

_BROKER_KEYS = ("runtime_dir", "state_dir", "frontend", "backend", "events", "http", "curve",
                "heartbeat_s", "liveness", "client_liveness_s", "max_payload", "max_reply",
                "log_level", "memory")

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
_GATEWAY_KEYS = ("listen", "api_keys", "api_keys_file", "api_keys_env", "timeout_s",
                 "max_input_chars", "max_upload", "pcm_rate", "models")
_GATEWAY_MODEL_KEYS = ("daemon", "task", "method", "voices", "speed", "arguments",
                       "instructions", "priority", "timeout_s")
_GATEWAY_SPEED_KEYS = ("argument", "scale", "min", "max")

_BAD = object()  # a value that failed validation; the error is already recorded
_FLOAT = "tag:yaml.org,2002:float"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"


# --- public functions ---------------------------------------------------------------

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
        **_curve_spec(config.broker),
    }


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


def interpreter_for(daemon: DaemonConfig) -> Path:
    """The Python executable the daemon runs with."""
    if daemon.venv is not None:
        return daemon.venv / "bin" / "python"
    return find_base_interpreter(daemon.python)


def find_base_interpreter(spec: str) -> Path:
    """Resolve "3.12", "3.8.18" or an interpreter path to an existing executable.

    A version is looked for in pyenv first ($PYENV_ROOT/versions, newest
    matching patch release), then as `pythonX.Y` on PATH.
    """
    if "/" in spec:
        exe = Path(os.path.expanduser(os.path.expandvars(spec)))
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
        raise FileNotFoundError(f"python interpreter {spec!r}: {exe} is not an executable file")

    m = PYTHON_VERSION.match(spec)
    if not m:
        raise ValueError(f"python {spec!r}: expected a version like '3.12' or '3.8.18', or a path")
    major, minor, patch = m.group(1), m.group(2), m.group(3)
    short = f"{major}.{minor}"
    tried = []

    versions = Path(os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")) / "versions"
    candidates = []
    if versions.is_dir():
        for entry in versions.iterdir():
            # Only plain X.Y.Z releases: skip "3.13.0t" (free-threaded), "3.12-dev", rcs.
            em = re.fullmatch(rf"{major}\.{minor}\.(\d+)", entry.name)
            if em and (patch is None or int(em.group(1)) == int(patch)):
                candidates.append((int(em.group(1)), entry))
    for _, entry in sorted(candidates, reverse=True):
        exe = entry / "bin" / f"python{short}"
        tried.append(str(exe))
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    if not candidates:
        tried.append(f"{versions}/{spec if patch else short + '.*'}")

    name = f"python{short}"
    found = shutil.which(name)
    tried.append(f"{name} on PATH")
    if found:
        # PATH gives some X.Y; an exact X.Y.Z request must get exactly that release.
        if patch is None or _version_of(found) == spec:
            return Path(found)
        tried[-1] += f" (found {found}, but it is not {spec})"
    raise FileNotFoundError(f"no python {spec} found; tried: " + "; ".join(tried))


def _version_of(exe: str) -> str | None:
    try:
        out = subprocess.run(
            [exe, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def format_size(n: int) -> str:
    """Bytes for people: "512 B", "1.5 KiB", "79.6 GiB" (binary units, as parse_size reads)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024.0
    raise AssertionError("unreachable")


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like "256MiB", "1.5 GB", "512k"; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a size")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(round(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]))
    raise ValueError(f"not a size: {value!r}")


# --- the validator ------------------------------------------------------------------

class _Parser:
    def __init__(self, path: Path | None):
        self.path = path
        self.label = str(path) if path is not None else "<string>"
        # Relative paths in the file mean "next to the file", as in most tools' configs.
        self.base = Path(os.path.abspath(path.parent)) if path is not None else Path.cwd()
        self.errors: list[tuple[int, str]] = []
        # One constructor per parse: it caches constructed objects per node.
        self.constructor = yaml.constructor.SafeConstructor()

    # -- reporting

    def error(self, where: Node | int, key: str, message: str) -> None:
        line = where if isinstance(where, int) else where.start_mark.line + 1
        prefix = f"{self.label}:{line}: "
        self.errors.append((line, prefix + (f"{key}: " if key else "") + message))

    # -- entry point

    def parse(self, text: str) -> Config:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            raise ConfigError(self._syntax_error(e)) from None
        except yaml.reader.ReaderError as e:
            # Bad characters: the error carries a character position, not a line.
            line = text.count("\n", 0, e.position) + 1
            char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
            raise ConfigError(f"{self.label}:{line}: YAML syntax error: character {char} "
                              f"is not allowed ({e.reason})") from None

        if root is None:
            self.error(1, "", "the configuration is empty; expected a mapping with a 'daemons' section")
            self._raise()
        # `chat:` is the chat loop's section (modelhost.pipelines.chat, `modelhost chat
        # --config F`): a client's settings, checked by the chat itself, never read here.
        top = self.mapping(root, "", ("broker", "daemons", "gateway", "chat"))
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

    def _raise(self) -> None:
        if self.errors:
            # Stable sort: file order, and for one line the order of discovery.
            raise ConfigError([msg for _, msg in sorted(self.errors, key=lambda e: e[0])])

    def _syntax_error(self, e: yaml.MarkedYAMLError) -> str:
        mark = e.problem_mark or e.context_mark
        where = f"{self.label}:{mark.line + 1}" if mark else self.label
        message = f"{where}: YAML syntax error: {e.problem or e.context}"
        if e.problem and e.context and e.context_mark is not None:
            message += f" ({e.context} at line {e.context_mark.line + 1})"
        return message

    # -- sections

    def broker(self, entry: tuple[Node, Node] | None) -> BrokerConfig:
        fields: dict[str, tuple[Node, Node]] = {}
        if entry is not None:
            fields = self.mapping(entry[1], "broker", _BROKER_KEYS) or {}

        def get(key: str, convert: Callable, default: Any, **kw) -> Any:
            return self.field(fields, "broker", key, convert, default, **kw)

        runtime_dir = get("runtime_dir", self.path_value, None) or _absolute(default_runtime_dir())
        state_dir = get("state_dir", self.path_value, None) or _default_state_dir()
        curve = get("curve", self.curve, None)
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

        level = get("log_level", self.string, "info")
        if isinstance(level, str) and level.lower() not in LOG_LEVELS:
            self.error(fields["log_level"][1], "broker.log_level",
                       f"expected one of {', '.join(LOG_LEVELS)}, got {level!r}"
                       + _suggest(level.lower(), LOG_LEVELS))
            level = "info"

        return BrokerConfig(
            runtime_dir=runtime_dir,
            state_dir=state_dir,
            frontend=endpoints["frontend"],
            backend=endpoints["backend"],
            heartbeat_s=get("heartbeat_s", self.duration, 1.0),
            liveness=get("liveness", self.integer, 3, minimum=1),
            client_liveness_s=get("client_liveness_s", self.duration, 10.0),
            max_payload_bytes=get("max_payload", self.size, 256 * 2**20),
            max_reply_bytes=get("max_reply", self.size, 256 * 2**20),
            log_level=level.lower(),
            memory=get("memory", self.memory, MemoryConfig()),
            events=endpoints["events"],
            http=get("http", self.http_address, DEFAULT_HTTP),
            curve=curve,
        )

    def memory(self, node: Node, kp: str) -> Any:
        fields = self.mapping(node, kp, _MEMORY_KEYS)
        if fields is None:
            return _BAD

        def get(key: str, convert: Callable, default: Any, **kw) -> Any:
            return self.field(fields, kp, key, convert, default, **kw)

        probe = get("probe", self.choice, "auto", choices=PROBES)
        default = DeviceLimit()
        threshold = get("threshold", self.threshold, None)
        if threshold is not None:
            default = _with_threshold(default, threshold)
        default = replace(default, external=get("external", self.choice, "count",
                                                choices=EXTERNAL_POLICIES))
        devices = {}
        if "devices" in fields:
            devices = self.device_limits(fields["devices"][1], f"{kp}.devices", default)
        return MemoryConfig(
            probe=probe,
            default=default,
            devices=devices,
            sample_s=get("sample_s", self.duration, 0.2),
            aging_s=get("aging_s", self.duration, 30.0),
            max_skips=get("max_skips", self.integer, 4, minimum=0),
            priority_window_s=get("priority_window_s", self.duration, 60.0, allow_zero=True),
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

        def get(key: str, convert: Callable, default: Any, **kw) -> Any:
            return self.field(fields, kp, key, convert, default, **kw)

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

        max_payload = get("max_payload", self.size, None)
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
        pin = get("pin", self.boolean, False)
        idle_ttl_s = get("idle_ttl_s", self.duration, None, allow_null=True)
        if pin and idle_ttl_s is not None:
            self.error(fields["idle_ttl_s"][1], f"{kp}.idle_ttl_s",
                       f"a pinned daemon is never unloaded (pin: true at line "
                       f"{fields['pin'][1].start_mark.line + 1}), so an idle TTL cannot apply; "
                       "remove one of the two")

        # Convert every field before deciding whether the daemon is usable, so
        # that all its errors are reported in one pass.
        values = dict(
            requirements=get("requirements", self.path_value, None),
            options=get("options", self.options, {}),
            pythonpath=tuple(get("pythonpath", self.path_list, ())),
            env=get("env", self.environment, {}),
            concurrency=get("concurrency", self.integer, 1, minimum=1),
            max_queue=get("max_queue", self.integer, 64, minimum=0),
            ready_timeout_s=get("ready_timeout_s", self.duration, 300.0),
            stop_timeout_s=get("stop_timeout_s", self.duration, 10.0),
            autostart=get("autostart", self.boolean, True),
            declared_resident=footprint.get("resident"),
            declared_peak=footprint.get("peak"),
            device=get("device", self.device_id, None),
            pin=pin,
            idle_ttl_s=idle_ttl_s,
            preload=get("preload", self.boolean, True),
            priority=get("priority", self.choice, None, choices=Priority.ALL),
        )
        if missing or not name_ok or engine is None or python is None:
            return None
        return DaemonConfig(name=name, engine=engine, python=python, venv=venv,
                            max_payload_bytes=max_payload, restart=restart,
                            line=knode.start_mark.line + 1, **values)

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

        def get(key: str, convert: Callable, default: Any, **kw) -> Any:
            return self.field(fields, "gateway", key, convert, default, **kw)

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
        pcm_rate = 24000
        if "pcm_rate" in fields:
            node = fields["pcm_rate"][1]
            if self.scalar(node) is None:
                pcm_rate = None
            else:
                pcm_rate = self.integer(node, "gateway.pcm_rate", minimum=8000)
                pcm_rate = 24000 if pcm_rate is _BAD else pcm_rate
        models = None
        if "models" in fields:
            models = self.gateway_models(fields["models"][1], "gateway.models", daemons)
        return GatewayConfig(
            host=host, port=port, api_keys=tuple(dict.fromkeys(keys)),
            timeout_s=get("timeout_s", self.duration, 600.0),
            max_input_chars=get("max_input_chars", self.integer,
                                DEFAULT_GATEWAY_MAX_INPUT_CHARS, minimum=1),
            max_upload_bytes=get("max_upload", self.size, DEFAULT_GATEWAY_MAX_UPLOAD),
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

            def get(key: str, convert: Callable, default: Any, **kw) -> Any:
                return self.field(fields, mkp, key, convert, default, **kw)

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
                method=get("method", self.string, None),
                arguments=get("arguments", self.options, {}),
                instructions=get("instructions", self.string, None),
                priority=get("priority", self.choice, None, choices=Priority.ALL),
                timeout_s=get("timeout_s", self.duration, None),
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

    def footprint(self, node: Node, kp: str) -> dict[str, int | None]:
        fields = self.mapping(node, kp, _FOOTPRINT_KEYS) or {}
        # 0 is a real footprint: a daemon that holds nothing on the device, or
        # whose calls need nothing beyond its weights.
        return {key: self.field(fields, kp, key, self.size, None, allow_zero=True)
                for key in _FOOTPRINT_KEYS}

    def restart(self, node: Node, kp: str) -> RestartPolicy:
        fields = self.mapping(node, kp, _RESTART_KEYS) or {}
        policy = RestartPolicy(**{
            key: self.field(fields, kp, key, self.duration, getattr(RestartPolicy, key))
            for key in _RESTART_KEYS})
        if policy.max_backoff_s < policy.backoff_s:
            key = "max_backoff_s" if "max_backoff_s" in fields else "backoff_s"
            self.error(fields[key][1], f"{kp}.{key}",
                       f"max_backoff_s ({policy.max_backoff_s}) is below backoff_s "
                       f"({policy.backoff_s})")
        return policy

    def field(self, fields: dict[str, tuple[Node, Node]], kp: str, key: str,
              convert: Callable, default: Any, **kw) -> Any:
        """The converted value of an optional key: its default when absent or invalid."""
        if key not in fields:
            return default
        value = convert(fields[key][1], f"{kp}.{key}", **kw)
        return default if value is _BAD else value

    # -- structure

    def mapping(self, node: Node, kp: str, allowed: tuple[str, ...] | None
                ) -> dict[str, tuple[Node, Node]] | None:
        """{key: (key node, value node)} of a mapping node, checking its keys.

        `allowed` None accepts any string key (daemon names, options).
        """
        if not isinstance(node, MappingNode):
            self.error(node, kp, f"expected a mapping, got {self.describe(node)}")
            return None
        # PyYAML keeps duplicate keys silently (the last one wins); here they are
        # an error, except those that come in through a `<<` merge, which are
        # meant to be overridden.
        seen: dict[str, Node] = {}
        for knode, _ in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                continue
            key = knode.value if isinstance(knode, ScalarNode) else None
            if key in seen:
                self.error(knode, _join(kp, str(key)),
                           f"duplicate key (first at line {seen[key].start_mark.line + 1})")
            elif key is not None:
                seen[key] = knode
        try:
            self.constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as e:
            self.error(e.problem_mark.line + 1 if e.problem_mark else node, kp,
                       f"bad merge: {e.problem}")
            return None

        out: dict[str, tuple[Node, Node]] = {}
        for knode, vnode in node.value:
            key = self.scalar(knode)
            if not isinstance(key, str):
                hint = "; quote it" if isinstance(knode, ScalarNode) else ""
                self.error(knode, kp, f"keys must be strings, got {self.describe(knode)}{hint}")
                continue
            if allowed is not None and key not in allowed:
                self.error(knode, _join(kp, key), "unknown key" + (
                    _suggest(key, allowed) or f" (expected one of: {', '.join(allowed)})"))
                continue
            out[key] = (knode, vnode)
        return out

    def scalar(self, node: Node) -> Any:
        """The Python value of a scalar node; _BAD for collections or unknown tags.

        Callers report _BAD as "expected X, got <describe(node)>".
        """
        if not isinstance(node, ScalarNode):
            return _BAD
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError:
            # Tags like `!foo` compose fine but have no safe constructor.
            return _BAD

    def describe(self, node: Node) -> str:
        standard = node.tag in (_SEQ, _MAP) if not isinstance(node, ScalarNode) \
            else node.tag.startswith("tag:yaml.org,2002:")
        if not standard:  # !!set, !!omap, !custom ...
            return "a value tagged " + node.tag.replace("tag:yaml.org,2002:", "!!")
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        if node.tag == "tag:yaml.org,2002:null":
            return "nothing (null)"
        if node.tag == "tag:yaml.org,2002:str":
            return repr(node.value)
        return node.value  # numbers and booleans as written

    # -- value converters: each returns the value, or _BAD after recording an error

    def string(self, node: Node, kp: str) -> Any:
        value = self.scalar(node)
        if not isinstance(value, str):
            self.error(node, kp, f"expected a string, got {self.describe(node)}")
            return _BAD
        return value

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

    def integer(self, node: Node, kp: str, minimum: int) -> Any:
        value = self.scalar(node)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.error(node, kp, f"expected {what}, got {self.describe(node)}")
            return _BAD
        return value

    def duration(self, node: Node, kp: str, allow_zero: bool = False,
                 allow_null: bool = False) -> Any:
        value = self.scalar(node)
        if value is None and allow_null:
            return None
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)):
            what = "a number of seconds >= 0" if allow_zero else "a positive number of seconds"
            self.error(node, kp, f"expected {what}, got {self.describe(node)}")
            return _BAD
        return float(value)

    def choice(self, node: Node, kp: str, choices: tuple[str, ...]) -> Any:
        value = self.scalar(node)
        if not isinstance(value, str) or value not in choices:
            suggestion = _suggest(value, choices) if isinstance(value, str) else ""
            self.error(node, kp, f"expected one of {', '.join(choices)}, "
                                 f"got {self.describe(node)}{suggestion}")
            return _BAD
        return value

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

    def boolean(self, node: Node, kp: str) -> Any:
        value = self.scalar(node)
        if not isinstance(value, bool):
            self.error(node, kp, f"expected true or false, got {self.describe(node)}")
            return _BAD
        return value

    def size(self, node: Node, kp: str, allow_zero: bool = False) -> Any:
        value = self.scalar(node)
        try:
            if isinstance(value, float):
                raise ValueError
            size = parse_size(value)
        except ValueError:
            self.error(node, kp, "expected a size in bytes, like 1048576, \"256MiB\" or "
                                 f"\"1.5 GB\", got {self.describe(node)}")
            return _BAD
        if size < 0 or (size == 0 and not allow_zero):
            what = "a size >= 0" if allow_zero else "a positive size"
            self.error(node, kp, f"expected {what}, got {self.describe(node)}")
            return _BAD
        return size

    def path_value(self, node: Node, kp: str, what: str = "a path") -> Any:
        value = self.scalar(node)
        if not isinstance(value, str) or not value:
            self.error(node, kp, f"expected {what}, got {self.describe(node)}")
            return _BAD
        expanded = self.expand(value, node, kp)
        return _BAD if expanded is _BAD else self.resolve(expanded)

    def path_list(self, node: Node, kp: str) -> Any:
        if not isinstance(node, SequenceNode):
            self.error(node, kp, f"expected a list of paths, got {self.describe(node)}")
            return _BAD
        paths = [self.path_value(item, f"{kp}[{i}]") for i, item in enumerate(node.value)]
        return [p for p in paths if p is not _BAD]

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

    def environment(self, node: Node, kp: str) -> Any:
        fields = self.mapping(node, kp, None)
        if fields is None:
            return _BAD
        env = {}
        for key, (knode, vnode) in fields.items():
            if not ENV_NAME.match(key):
                self.error(knode, _join(kp, key), "not a valid environment variable name")
                continue
            value = self.scalar(vnode)
            if isinstance(value, str):
                env[key] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                # The text as written: `1.10` stays "1.10", not "1.1".
                env[key] = vnode.value
            else:
                quote = "; quote it" if isinstance(value, bool) else ""
                self.error(vnode, _join(kp, key),
                           f"expected a string or a number, got {self.describe(vnode)}{quote}")
        return env

    def options(self, node: Node, kp: str) -> Any:
        fields = self.mapping(node, kp, None)
        if fields is None:
            return _BAD
        options = {}
        for key, (knode, vnode) in fields.items():
            if not key.isidentifier():
                # Options become keyword arguments of the engine's constructor.
                self.error(knode, _join(kp, key), "option names must be Python identifiers")
                continue
            value = self.plain(vnode, _join(kp, key), set())
            if value is not _BAD:
                options[key] = value
        return options

    def plain(self, node: Node, kp: str, active: set[int]) -> Any:
        """A JSON-able value (the daemon spec is JSON): null, bool, number, string, list, mapping."""
        if id(node) in active:
            self.error(node, kp, "a recursive alias cannot be passed to a daemon")
            return _BAD
        if not isinstance(node, ScalarNode) and node.tag not in (_SEQ, _MAP):
            # `!!set`, `!!omap`, `!custom [...]`: not plain lists and mappings.
            self.error(node, kp, f"{self.describe(node)} cannot be passed to a daemon")
            return _BAD
        if isinstance(node, SequenceNode):
            active.add(id(node))
            items = [self.plain(item, f"{kp}[{i}]", active) for i, item in enumerate(node.value)]
            active.discard(id(node))
            return _BAD if any(i is _BAD for i in items) else items
        if isinstance(node, MappingNode):
            fields = self.mapping(node, kp, None)
            if fields is None:
                return _BAD
            active.add(id(node))
            out = {k: self.plain(v, _join(kp, k), active) for k, (_, v) in fields.items()}
            active.discard(id(node))
            return _BAD if any(v is _BAD for v in out.values()) else out
        value = self.scalar(node)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        kind = type(value).__name__ if value is not _BAD else self.describe(node)
        self.error(node, kp, f"{kind} cannot be passed to a daemon (its spec is JSON); "
                             "quote it to pass a string")
        return _BAD

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

    # -- paths

    def expand(self, value: str, node: Node, kp: str) -> Any:
        # os.path.expandvars leaves unknown variables as they are, which would
        # make a directory literally named "$FOO": report them instead.
        unset = [m.group(1) or m.group(2) for m in _ENV_REF.finditer(value)
                 if (m.group(1) or m.group(2)) not in os.environ]
        if unset:
            self.error(node, kp, "environment variable " + ", ".join(f"${v}" for v in unset)
                                 + " is not set")
            return _BAD
        return os.path.expanduser(os.path.expandvars(value))

    def resolve(self, value: str) -> Path:
        return Path(os.path.abspath(self.base / value))


# --- helpers ------------------------------------------------------------------------

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


def _join(kp: str, key: str) -> str:
    return f"{kp}.{key}" if kp else key


def _with_threshold(limit: DeviceLimit, threshold: tuple[str, float | int]) -> DeviceLimit:
    kind, value = threshold
    if kind == "fraction":
        return replace(limit, threshold_fraction=value, threshold_bytes=None)
    return replace(limit, threshold_fraction=None, threshold_bytes=value)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


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
