"""What the gateway serves: its settings from the spec, and the embedded default mapping.

The spec is the plain dict `modelhost.broker.config.gateway_spec` makes from the
configuration (written to a JSON file by `modelhost up`, handed over in-process by
`modelhost gateway`); this module never imports the broker.
"""

import dataclasses
from typing import Dict, Optional, Tuple

from .. import protocol

ESPEAK_ENGINE = "modelhost.daemons.espeak.engine:EspeakEngine"
COSYVOICE_ENGINE = "modelhost.daemons.cosyvoice.engine:CosyVoiceEngine"
ASR_ENGINE_PREFIX = "modelhost.daemons.asr."

# OpenAI's built-in voices as espeak voices: US and British English, with espeak's
# variants for a spread of pitches and timbres (a rough likeness, not a match).
ESPEAK_VOICES = {
    "alloy": "en-us",
    "ash": "en-us+m3",
    "ballad": "en-gb+m4",
    "cedar": "en-gb+m3",
    "coral": "en-us+f2",
    "echo": "en-us+m1",
    "fable": "en-gb",
    "marin": "en-us+f1",
    "nova": "en-us+f3",
    "onyx": "en-us+m7",
    "sage": "en-gb+f4",
    "shimmer": "en-us+f4",
    "verse": "en-gb-x-rp+m2",
}
# espeak's rate is words a minute (80 .. 450); OpenAI's speed 1.0 is the daemon's default rate.
ESPEAK_DEFAULT_RATE = 175
ESPEAK_RATE_RANGE = (80, 450)

# The OpenAI model names the embedded default answers to, by task.
DEFAULT_SPEECH_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
DEFAULT_TRANSCRIPTION_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
DEFAULT_METHODS = {"speech": "tts", "transcription": "transcribe"}
DEFAULT_PRIORITIES = {"speech": protocol.Priority.INTERACTIVE,
                      "transcription": protocol.Priority.NORMAL}


@dataclasses.dataclass(frozen=True)
class Speed(object):
    """OpenAI's speed (0.25 .. 4) as a daemon argument: round(speed * scale) for a scale
    that is not 1 (espeak's words a minute), clamped into [low, high]."""

    argument: str
    scale: float = 1.0
    low: Optional[float] = None
    high: Optional[float] = None

    def value(self, speed):
        value = speed * self.scale
        if self.low is not None:
            value = max(self.low, value)
        if self.high is not None:
            value = min(self.high, value)
        return int(round(value)) if self.scale != 1.0 else float(value)


@dataclasses.dataclass(frozen=True)
class Route(object):
    """One OpenAI model name and the daemon call it stands for."""

    name: str
    daemon: str
    task: str  # "speech" | "transcription"
    method: str
    engine: Optional[str]  # the daemon's engine ("module:Class"), None when unknown
    voices: Optional[Dict[str, str]]  # OpenAI voice -> daemon voice; None: pass names through
    speed: Optional[Speed]  # None: only speed 1.0 is accepted
    arguments: dict
    instructions: Optional[str]  # the argument `instructions` becomes; None: dropped
    priority: str
    timeout_s: Optional[float]  # None: the gateway's timeout_s

    def voice(self, name):
        """The daemon's voice for an OpenAI voice name (names not in the map pass through)."""
        if self.voices and name in self.voices:
            return self.voices[name]
        return name


@dataclasses.dataclass(frozen=True)
class Settings(object):
    host: str = "127.0.0.1"
    port: int = 8000
    endpoint: Optional[str] = None  # the broker's frontend; None: the default endpoint
    curve: Optional[dict] = None
    api_keys: Tuple[str, ...] = ()
    timeout_s: float = 600.0
    max_input_chars: int = 4096
    max_upload_bytes: int = 25 * 2**20
    pcm_rate: Optional[int] = 24000
    routes: Dict[str, Route] = dataclasses.field(default_factory=dict)
    # Daemon name -> the route a request naming the daemon itself as `model` takes
    # (the first model mapped to it).
    daemon_routes: Dict[str, Route] = dataclasses.field(default_factory=dict)
    daemons: Dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> {engine, options}
    log_level: str = "info"
    address_file: Optional[str] = None  # where the bound address is written once listening
    parent_pid: Optional[int] = None  # exit when this process is gone (`modelhost up`)

    @classmethod
    def from_spec(cls, spec):
        daemons = dict(spec.get("daemons") or {})
        models = spec.get("models")
        if models is None:
            models = default_models(daemons)
        routes = {name: _route(name, entry, daemons) for name, entry in models.items()}
        daemon_routes = {}
        for route in routes.values():
            daemon_routes.setdefault(route.daemon, route)
        return cls(
            host=spec.get("host", "127.0.0.1"), port=int(spec.get("port", 8000)),
            endpoint=spec.get("endpoint"), curve=spec.get("curve"),
            api_keys=tuple(spec.get("api_keys") or ()),
            timeout_s=float(spec.get("timeout_s", 600.0)),
            max_input_chars=int(spec.get("max_input_chars", 4096)),
            max_upload_bytes=int(spec.get("max_upload_bytes", 25 * 2**20)),
            pcm_rate=spec.get("pcm_rate", 24000), routes=routes, daemon_routes=daemon_routes,
            daemons=daemons, log_level=spec.get("log_level", "info"),
            address_file=spec.get("address_file"), parent_pid=spec.get("parent_pid"))

    def route(self, model):
        """The route for a request's `model`: a mapped name, or a mapped daemon's own name."""
        return self.routes.get(model) or self.daemon_routes.get(model)


def default_models(daemons):
    """The embedded default mapping: OpenAI's speech models to the `espeak` daemon (else the
    first espeak or CosyVoice daemon), its transcription models to `asr` (else the first
    daemon of a modelhost.daemons.asr engine). Only daemons the configuration has."""
    def engine(name):
        return (daemons.get(name) or {}).get("engine") or ""

    speech = "espeak" if "espeak" in daemons else next(
        (name for name in daemons if engine(name) in (ESPEAK_ENGINE, COSYVOICE_ENGINE)), None)
    transcription = "asr" if "asr" in daemons else next(
        (name for name in daemons if engine(name).startswith(ASR_ENGINE_PREFIX)), None)
    models = {}
    if speech is not None:
        models.update((name, {"daemon": speech, "task": "speech"})
                      for name in DEFAULT_SPEECH_MODELS)
    if transcription is not None:
        models.update((name, {"daemon": transcription, "task": "transcription"})
                      for name in DEFAULT_TRANSCRIPTION_MODELS)
    return models


def _route(name, entry, daemons):
    daemon = entry["daemon"]
    task = entry["task"]
    engine = (daemons.get(daemon) or {}).get("engine")
    options = (daemons.get(daemon) or {}).get("options") or {}
    voices = entry.get("voices")
    speed = entry.get("speed")
    if engine == ESPEAK_ENGINE:
        if voices is None:
            voices = dict(ESPEAK_VOICES)
        if speed is None:
            rate = options.get("rate", ESPEAK_DEFAULT_RATE)
            speed = {"argument": "rate", "scale": rate, "min": ESPEAK_RATE_RANGE[0],
                     "max": ESPEAK_RATE_RANGE[1]}
    elif engine == COSYVOICE_ENGINE and speed is None:
        speed = {"argument": "speed"}
    return Route(
        name=name, daemon=daemon, task=task,
        method=entry.get("method") or DEFAULT_METHODS[task], engine=engine, voices=voices,
        speed=None if speed is None else Speed(
            speed["argument"], float(speed.get("scale") or 1.0), speed.get("min"),
            speed.get("max")),
        arguments=dict(entry.get("arguments") or {}), instructions=entry.get("instructions"),
        priority=entry.get("priority") or DEFAULT_PRIORITIES[task],
        timeout_s=entry.get("timeout_s"))
