"""The configuration as the broker uses it: frozen dataclasses, each field's default
written once (the parser takes it from here: `default_of`), and byte sizes.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from modelhost import _shm


class ConfigError(Exception):
    """A configuration that cannot be used; `.errors` holds one message per problem."""

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


# What broker.max_payload and broker.max_reply are unless configured.
DEFAULT_MAX_MESSAGE = 256 * 2**20


def default_of(cls: type, name: str) -> Any:
    """The default the configuration dataclass `cls` declares for its field `name`
    (a fresh one, for a default_factory): each default is written there, once."""
    spec = cls.__dataclass_fields__[name]
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


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
class ShmConfig:
    """Large payloads in shared-memory segments instead of frames (modelhost._shm)."""

    # A binary leaf (bytes, an array's data) this big or bigger goes into a
    # segment; None: never (`threshold: off`), every payload is a frame.
    threshold: int | None = _shm.DEFAULT_THRESHOLD
    # Above this many bytes in this user's segments, payloads go as frames.
    max_total: int = _shm.DEFAULT_MAX_TOTAL
    # None: _shm.default_dir(runtime_dir) ($MODELHOST_SHM_DIR, /dev/shm, <runtime_dir>/shm).
    dir: Path | None = None


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
    max_payload_bytes: int = DEFAULT_MAX_MESSAGE
    # The largest frame a daemon may send (a result's payload): the backend
    # socket refuses more, so no peer there can make the broker buffer
    # gigabytes; the daemon runtime answers payload_too_large instead.
    max_reply_bytes: int = DEFAULT_MAX_MESSAGE
    log_level: str = "info"  # debug|info|warning|error
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # (host, port) of the metrics and dashboard server, loopback only; port 0
    # takes any free port; None: no HTTP server.
    http: tuple[str, int] | None = DEFAULT_HTTP
    # None: no CURVE, and then tcp:// only on loopback.
    curve: CurveConfig | None = None
    shm: ShmConfig = field(default_factory=ShmConfig)

    @property
    def daemon_expiry_s(self) -> float:
        """A daemon silent this long (liveness heartbeats) is taken for dead."""
        return self.heartbeat_s * self.liveness


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


# What a `python:` version looks like: "3.12" or "3.8.18".
PYTHON_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "m": 2**20, "g": 2**30,  # bare letters: what `ulimit` and friends mean
    "ki": 2**10, "mi": 2**20, "gi": 2**30,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
}


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
