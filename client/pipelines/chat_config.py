"""The voice chat's configuration: ChatConfig and the stage dataclasses it is made of
(StageConfig, TTSConfig with its VoiceRegistration, VideoConfig, VADConfig), their
parsing from plain data with errors that name the key (ChatConfigError), and
load_config_file for a chat file or a modelhost configuration's `chat:` section.
Split out of chat.py (issue 13); chat.py re-exports every public name here.
"""

import dataclasses
import difflib
import json
from typing import Optional

from .llm import LLMConfig


class ChatConfigError(ValueError):
    """The chat's configuration is not valid; the message names the key."""


# --- configuration ------------------------------------------------------------------------


@dataclasses.dataclass
class StageConfig:
    model: str
    method: str
    # Further arguments of every call (e.g. {"language": "en"} for ASR).
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class VoiceRegistration:
    """A voice to register once with a TTS daemon that supports it (CosyVoice's
    register_voice), then used by id."""
    voice_id: str
    prompt_audio: str  # a WAV/FLAC file of the voice
    prompt_text: str  # what it says


@dataclasses.dataclass
class TTSConfig:
    model: str = "espeak"
    method: str = "tts"
    # A voice name the daemon knows (espeak: "en-us"; CosyVoice: a registered id).
    voice: Optional[str] = None
    options: dict = dataclasses.field(default_factory=dict)
    register: Optional[VoiceRegistration] = None


@dataclasses.dataclass
class VideoConfig:
    model: str = "talkinggaussian"
    method: str = "render"
    options: dict = dataclasses.field(default_factory=dict)
    # Pass each render the frame where the previous one ended (TalkingGaussian's
    # start_frame), so the head moves on smoothly across sentences and turns.
    chain_frames: bool = True


@dataclasses.dataclass
class VADConfig:
    threshold_db: float = -45.0
    margin_db: float = 12.0
    start_s: float = 0.09
    end_silence_s: float = 0.6
    preroll_s: float = 0.3
    sample_rate: int = 16000


@dataclasses.dataclass
class ChatConfig:
    asr: StageConfig = dataclasses.field(
        default_factory=lambda: StageConfig("asr", "transcribe"))
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    tts: TTSConfig = dataclasses.field(default_factory=TTSConfig)
    video: Optional[VideoConfig] = None  # None: audio only
    vad: VADConfig = dataclasses.field(default_factory=VADConfig)
    # TTS calls outstanding at once (>= 2 overlaps sentence n+1 with n's audio).
    lookahead: int = 2
    # Past turns (user and reply) sent with each request.
    history_turns: int = 8
    out_dir: Optional[str] = None  # where FileSink writes (None: nowhere)
    play: bool = False  # play the audio on the default output device
    endpoint: Optional[str] = None  # the broker (None: the default endpoint)
    timeout_s: Optional[float] = 120.0  # per daemon call

    @classmethod
    def from_dict(cls, data, where="chat"):
        """A ChatConfig from plain data (a YAML `chat:` section, or JSON); unknown keys and
        wrong types are ChatConfigError naming the key."""
        return _build(cls, data or {}, where)

    def to_dict(self):
        return dataclasses.asdict(self)


_NESTED = {("ChatConfig", "asr"): StageConfig, ("ChatConfig", "llm"): LLMConfig,
           ("ChatConfig", "tts"): TTSConfig, ("ChatConfig", "video"): VideoConfig,
           ("ChatConfig", "vad"): VADConfig, ("TTSConfig", "register"): VoiceRegistration}


def _build(cls, data, where):
    if isinstance(data, str) and cls is StageConfig:
        data = {"model": data}
    if not isinstance(data, dict):
        raise ChatConfigError("{}: expected a mapping, not {}".format(where, type(data).__name__))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            raise ChatConfigError("{}.{}: unknown key{}".format(
                where, key, "; did you mean {!r}?".format(close[0]) if close else
                " (expected one of: {})".format(", ".join(fields))))
        nested = _NESTED.get((cls.__name__, key))
        if nested is not None:
            if value is None:
                values[key] = None
                continue
            if cls is ChatConfig and key == "asr" and isinstance(value, dict):
                value = dict({"model": "asr", "method": "transcribe"}, **value)
            values[key] = _build(nested, value, where + "." + key)
            continue
        values[key] = _check_type(value, fields[key], where + "." + key)
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ChatConfigError("{}: missing {}".format(where, ", ".join(missing)))
    return cls(**values)


def _check_type(value, field, where):
    expected, optional = field.type, False
    arguments = getattr(expected, "__args__", None)
    if arguments and type(None) in arguments:  # Optional[X]
        expected = next(a for a in arguments if a is not type(None))
        optional = True
    if value is None:
        if optional:
            return None
        raise ChatConfigError("{}: may not be null".format(where))
    names = {str: "a string", float: "a number", int: "an integer", bool: "true or false",
             dict: "a mapping", list: "a list"}
    if expected not in names:
        return value
    if isinstance(value, bool) and expected in (int, float):
        raise ChatConfigError("{}: expected a number, not {!r}".format(where, value))
    accepted = (int, float) if expected is float else expected
    if not isinstance(value, accepted):
        raise ChatConfigError("{}: expected {}, not {!r}".format(where, names[expected], value))
    return float(value) if expected is float else value


def load_config_file(path):
    """(ChatConfig, whole file's data) from a chat file or a modelhost configuration.

    The file is YAML (PyYAML) or JSON. Its `chat:` section is the chat's
    configuration; a file without one (and with no `daemons:`) is taken as the
    chat section itself.
    """
    with open(path) as handle:
        text = handle.read()
    data = _parse(text, path)
    if not isinstance(data, dict):
        raise ChatConfigError("{}: expected a mapping at the top".format(path))
    if "chat" in data:
        section, where = data["chat"], "{}: chat".format(path)
    elif "daemons" in data or "broker" in data:
        section, where = {}, "{}: chat".format(path)
    else:
        section, where = data, "{}: chat".format(path)
    return ChatConfig.from_dict(section, where), data


def _parse(text, path):
    if str(path).endswith(".json"):
        return json.loads(text)
    try:
        import yaml
    except ImportError:
        try:
            return json.loads(text)
        except ValueError:
            raise ChatConfigError("{} is not JSON, and reading YAML needs PyYAML: pip install "
                                  "pyyaml".format(path))
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ChatConfigError("{}: not valid YAML: {}".format(path, exc))
