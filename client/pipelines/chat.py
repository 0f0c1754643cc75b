"""The voice chat loop: speech recognition -> language model -> text-to-speech -> talking head.

    from modelhost.pipelines.chat import Chat, ChatConfig
    config = ChatConfig.from_dict({"llm": {"url": "http://127.0.0.1:8080/v1"},
                                   "out_dir": "chat-out"})
    with Chat(config) as chat:
        result = chat.turn(text="What is two plus two?")     # or audio="question.wav"
        print(result.reply, result.metrics, result.files)

or `modelhost chat` on the command line. Written only against the public
client API (`modelhost.AsyncClient`), on one asyncio loop (`AsyncChat`;
`Chat` runs it on a thread of its own and is safe to call from any thread).

A turn:

1. It starts from text, a WAV file (one `transcribe` call of the ASR
   daemon), or speech the microphone's voice detector cut out (a streaming
   session: `stream_start`, `stream_feed` as it is spoken, `stream_end`).
   At its start the broker is asked to make the TTS and video daemons
   resident (`load`, not waited for), so the first sentence does not wait
   for an onload.
2. The language model's reply streams (an OpenAI-compatible endpoint, see
   `llm.py`; without one, an echo rule) and is cut into sentences as it
   comes (`sentences.py`).
3. Each sentence goes to the TTS daemon as soon as it is complete, as a
   streamed call: up to `lookahead` calls are outstanding at once, so sentence
   n+1 is submitted while n's audio still arrives, and audio is handed on in
   sentence order, chunk by chunk, as it arrives.
4. With a talking head configured, each sentence's audio, once whole, is
   rendered (streamed fmp4 segments), one sentence after another, each
   continuing the head's motion where the last ended (`start_frame`).

Every call is sent at `interactive` priority. Output goes to a Sink
(`chat_io.FileSink`: a WAV, and an mp4 with video, per turn; `chat_io.Player`
plays it).

Interruption: `interrupt()` (from any thread; the command line calls it on
Ctrl-C, on a new typed line, and when the microphone hears the user speak)
cancels the turn's LLM stream and every TTS, video and ASR call it has
running, all at once. Output passes through one guard: `interrupt()` closes
it for the turn before it returns, so no audio or video of that turn reaches
the sink afterwards, whatever is still in flight.

Per turn, `TurnResult.metrics` holds seconds from the turn's start (the
input complete: text given, WAV file given, or end of speech heard) to the
transcript, the first LLM token, the first audio chunk, the first video
segment, and the total.
"""

import asyncio
import collections
import dataclasses
import difflib
import json
import os
import threading
import time
from typing import Optional

from modelhost import AsyncClient, ModelhostError, protocol

from . import chat_io
from .llm import EchoReply, LLMConfig, LLMError, make_reply_source
from .sentences import SentenceSplitter

INTERACTIVE = protocol.Priority.INTERACTIVE

_END = object()  # the end of a queue's items


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


# --- what a turn reports ---------------------------------------------------------------


@dataclasses.dataclass
class CallRecord:
    """One daemon call (or the LLM stream) of a turn, and how it ended."""
    stage: str  # asr, llm, tts, video
    model: Optional[str]
    method: Optional[str]
    sentence: Optional[int]
    submitted_s: float  # from the turn's start
    ended_s: Optional[float] = None
    outcome: Optional[str] = None  # ok, cancelled, error
    error: Optional[str] = None


@dataclasses.dataclass
class TurnResult:
    turn: int
    source: str  # text, wav, mic
    transcript: Optional[str]  # what the user said (the text itself for a text turn)
    reply: str  # the reply as the model gave it (up to the interrupt)
    sentences: list  # the reply's sentences, as sent to TTS
    spoken: list  # the sentences whose audio reached the sink (at least in part)
    outcome: str  # done, interrupted, failed
    errors: list
    metrics: dict  # seconds: transcript_s, first_token_s, first_audio_s, first_video_s, total_s
    files: dict  # from the sink: wav, mp4
    calls: list  # CallRecord of every call
    audio_s: float = 0.0  # seconds of audio emitted
    video_segments: int = 0

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ChatEvent:
    """Told to on_event as the loop goes: kind, the turn (None outside turns), seconds since
    the turn's start, and fields by kind (notice: message; load: model, state/error;
    transcript: text; token: text; sentence: index, text; call: record; turn_end: result)."""
    kind: str
    turn: Optional[int]
    at_s: float
    fields: dict


class _Turn(object):
    def __init__(self, turn_id, source, started=None):
        self.id = turn_id
        self.source = source
        self.started = time.monotonic() if started is None else started
        self.tasks = set()
        self.cancelled = False
        self.marks = {}
        self.calls = []
        self.errors = []
        self.transcript = None
        self.reply = ""
        self.sentences = []
        self.spoken = []
        self.audio_s = 0.0
        self.video_segments = 0

    def now(self):
        return time.monotonic() - self.started

    def mark(self, name):
        if name not in self.marks:
            self.marks[name] = self.now()

    def spawn(self, coroutine):
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if self.cancelled:
            task.cancel()
        return task


class _Interrupted(Exception):
    pass


# --- the loop -------------------------------------------------------------------------


class AsyncChat(object):
    """The chat loop on the running asyncio loop. See the module docstring."""

    def __init__(self, config=None, endpoint=None, sink=None, on_event=None, client=None):
        self.config = config or ChatConfig()
        self.endpoint = endpoint or self.config.endpoint
        self.sink = sink if sink is not None else chat_io.Sink()
        self.on_event = on_event
        self._client = client
        self._own_client = client is None
        self._reply = None
        self._voice = self.config.tts.voice
        self._history = []  # [{"role", "content"}], trimmed to history_turns
        self._turn_ids = 0
        self._turns = {}
        # The output guard: which turn may emit now. interrupt() clears it (from any
        # thread) before it returns; the sink is only called while holding it.
        self._guard = threading.RLock()
        self._live = None
        self._loop = None
        self._loads = {}  # model -> its load task, while it runs
        self._next_frame = 0  # where the talking head's motion goes on
        self._started = False
        self._listening = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self):
        """Connect, check the daemons exist, pick the reply source, register the voice."""
        if self._started:
            return self
        self._loop = asyncio.get_running_loop()
        if self._client is None:
            self._client = AsyncClient(self.endpoint, timeout=self.config.timeout_s)
        status = await self._client.ps()
        daemons = {row["name"]: row for row in status.get("daemons", [])}
        stages = [("tts", self.config.tts.model)]
        if self.config.video is not None:
            stages.append(("video", self.config.video.model))
        for stage, model in stages:
            if model not in daemons:
                raise ChatConfigError("chat.{}.model: the broker has no daemon {!r}; it has: "
                                      "{}".format(stage, model, ", ".join(sorted(daemons))
                                                  or "none"))
        self._reply = make_reply_source(self.config.llm)
        if isinstance(self._reply, EchoReply):
            self._event("notice", None, message=self._reply.description + " (set chat.llm.url, "
                        "or --llm-url, to an OpenAI-compatible endpoint)")
        else:
            self._event("notice", None, message="replies from the " + self._reply.description)
        registration = self.config.tts.register
        if registration is not None:
            await self._register_voice(registration, daemons.get(self.config.tts.model))
        self._started = True
        return self

    async def _register_voice(self, registration, row):
        methods = (row or {}).get("methods")
        if methods is not None and methods and "register_voice" not in methods:
            raise ChatConfigError(
                "chat.tts.register: the TTS daemon {!r} has no register_voice operation (it "
                "has: {}); give a voice name it knows as chat.tts.voice instead".format(
                    self.config.tts.model, ", ".join(methods)))
        from modelhost.models import audio_bytes

        started = time.monotonic()
        await self._client.call(self.config.tts.model, "register_voice", priority=INTERACTIVE,
                                arguments={"voice_id": registration.voice_id,
                                           "prompt_audio": audio_bytes(registration.prompt_audio),
                                           "prompt_text": registration.prompt_text})
        self._voice = registration.voice_id
        self._event("notice", None, message="voice {!r} registered with {} in {:.2f}s; every "
                    "sentence uses it by id".format(registration.voice_id, self.config.tts.model,
                                                    time.monotonic() - started))

    async def aclose(self):
        self.interrupt()
        for task in list(self._loads.values()):
            task.cancel()
        if self._listening is not None:
            self._listening.cancel()
        if self._reply is not None:
            await self._reply.aclose()
        if self._own_client and self._client is not None:
            await self._client.aclose()
        self.sink.close()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc_info):
        await self.aclose()

    # --- interruption ----------------------------------------------------------------

    def interrupt(self):
        """Stop the running turn: cancel its calls, emit nothing more of it. Safe from any
        thread; returns the id of the turn it stopped (None when none was running)."""
        with self._guard:
            turn_id, self._live = self._live, None
            if turn_id is None:
                return None
            turn = self._turns.get(turn_id)
            self.sink.interrupted(turn_id)
        if turn is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel, turn)
        return turn_id

    def _cancel(self, turn):
        if turn.cancelled:
            return
        turn.cancelled = True
        turn.mark("interrupted")
        for task in list(turn.tasks):
            task.cancel()

    @property
    def live_turn(self):
        return self._live

    # --- a turn ----------------------------------------------------------------------

    async def run_turn(self, text=None, audio=None, sample_rate=None, source=None,
                       transcript_s=None, started=None):
        """Run one turn from `text`, or from `audio` (a WAV file's path or bytes, or raw
        16-bit PCM with sample_rate) through the ASR daemon. Returns its TurnResult; an
        earlier turn still running is interrupted first.

        `started` (time.monotonic()) and `transcript_s`: for a transcript made before the
        turn (the microphone's), where the turn began and when its transcript came."""
        if not self._started:
            await self.start()
        if (text is None) == (audio is None):
            raise ValueError("run_turn takes text or audio, not {}".format(
                "both" if text is not None else "neither"))
        self.interrupt()
        self._turn_ids += 1
        turn = _Turn(self._turn_ids, source or ("text" if text is not None else "wav"), started)
        self._turns[turn.id] = turn
        with self._guard:
            self._live = turn.id
            self.sink.turn_started(turn.id)
        self._event("turn_start", turn, source=turn.source)
        self._prepare_daemons(turn)
        try:
            if audio is not None:
                text = await self._stage(turn, self._transcribe(turn, audio, sample_rate))
            elif transcript_s is not None:
                turn.marks["transcript"] = transcript_s
            turn.transcript = text
            if audio is not None or transcript_s is not None:
                self._event("transcript", turn, text=text)
            if not (text or "").strip():
                turn.errors.append("nothing was heard: the transcript is empty")
            else:
                await self._respond(turn, text)
        except _Interrupted:
            pass
        except asyncio.CancelledError:
            self._cancel(turn)
            raise
        except Exception as exc:  # a stage failed outright: the turn ends, the loop goes on
            turn.errors.append("{}: {}".format(type(exc).__name__, exc))
            for task in list(turn.tasks):
                task.cancel()
        finally:
            with self._guard:
                if self._live == turn.id:
                    self._live = None
        if turn.tasks:
            # Cancelled calls finish their last step (the cancel sent, the record closed).
            await asyncio.wait(list(turn.tasks))
        result = self._result(turn)
        self._remember(turn)
        self.sink.turn_ended(result)
        self._turns.pop(turn.id, None)
        self._event("turn_end", turn, result=result)
        return result

    async def _stage(self, turn, coroutine):
        """Run a step of the turn as one of its tasks; _Interrupted if the turn was stopped."""
        task = turn.spawn(coroutine)
        await asyncio.wait([task])
        if task.cancelled():
            raise _Interrupted()
        return task.result()

    def _prepare_daemons(self, turn):
        """Ask the broker to make the TTS and video daemons resident; never waited for."""
        models = [self.config.tts.model]
        if self.config.video is not None:
            models.append(self.config.video.model)
        for model in models:
            if model in self._loads:
                continue  # asked already, still on its way
            self._event("load", turn, model=model, state="asked")
            task = asyncio.ensure_future(self._load(turn, model))
            self._loads[model] = task
            task.add_done_callback(lambda _task, model=model: self._loads.pop(model, None))

    async def _load(self, turn, model):
        started = time.monotonic()
        try:
            row = await self._client.load(model, priority=INTERACTIVE)
        except ModelhostError as exc:
            self._event("load", turn, model=model, state="failed", error=str(exc))
            return
        self._event("load", turn, model=model, state=(row or {}).get("tier") or "resident",
                    took_s=time.monotonic() - started)

    async def _transcribe(self, turn, audio, sample_rate):
        asr = self.config.asr
        if isinstance(audio, (str, os.PathLike)):
            with open(audio, "rb") as handle:
                audio = handle.read()
        arguments = dict(asr.options, audio=audio)
        if sample_rate is not None:
            arguments["sample_rate"] = sample_rate
        record = self._record(turn, "asr", asr.model, asr.method, None)
        try:
            result = await self._client.call(asr.model, asr.method, priority=INTERACTIVE,
                                             arguments=arguments)
        except asyncio.CancelledError:
            self._ended(turn, record, "cancelled")
            raise
        except ModelhostError as exc:
            self._ended(turn, record, "error", exc)
            turn.errors.append("speech recognition ({}): {}".format(asr.model, exc))
            return ""
        self._ended(turn, record, "ok")
        turn.mark("transcript")
        return (result.get("text") if isinstance(result, dict) else str(result or "")).strip()

    async def _respond(self, turn, text):
        messages = [{"role": "system", "content": self.config.llm.system}] if \
            self.config.llm.system and not isinstance(self._reply, EchoReply) else []
        messages += self._history + [{"role": "user", "content": text}]
        sentences = asyncio.Queue()
        slots = asyncio.Queue()
        video = asyncio.Queue() if self.config.video is not None else None
        tasks = [turn.spawn(self._think(turn, messages, sentences)),
                 turn.spawn(self._submit_speech(turn, sentences, slots)),
                 turn.spawn(self._emit_speech(turn, slots, video))]
        if video is not None:
            tasks.append(turn.spawn(self._render(turn, video)))
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()

    async def _think(self, turn, messages, sentences):
        """The LLM's reply, streamed, cut into sentences for _submit_speech."""
        splitter = SentenceSplitter()
        record = self._record(turn, "llm", getattr(self._reply, "model", None), None, None)
        try:
            async for delta in self._reply.stream(messages):
                turn.mark("first_token")
                turn.reply += delta
                self._event("token", turn, text=delta)
                for sentence in splitter.feed(delta):
                    self._sentence(turn, sentence, sentences)
            rest = splitter.flush()
            if rest:
                self._sentence(turn, rest, sentences)
            record.model = getattr(self._reply, "model", None)
            self._ended(turn, record, "ok")
        except asyncio.CancelledError:
            self._ended(turn, record, "cancelled")
            raise
        except LLMError as exc:
            self._ended(turn, record, "error", exc)
            turn.errors.append(str(exc))
            rest = splitter.flush()
            if rest:
                self._sentence(turn, rest, sentences)
        finally:
            sentences.put_nowait(_END)

    def _sentence(self, turn, text, sentences):
        index = len(turn.sentences)
        turn.sentences.append(text)
        self._event("sentence", turn, index=index, text=text)
        sentences.put_nowait((index, text))

    async def _submit_speech(self, turn, sentences, slots):
        """A TTS call per sentence as it comes, at most `lookahead` outstanding; each
        sentence's chunks go to its own queue, queued in `slots` in sentence order."""
        outstanding = asyncio.Semaphore(max(1, self.config.lookahead))
        try:
            while True:
                item = await sentences.get()
                if item is _END:
                    break
                index, text = item
                await outstanding.acquire()
                chunks = asyncio.Queue()
                slots.put_nowait((index, chunks))
                turn.spawn(self._speak(turn, index, text, chunks, outstanding))
        finally:
            slots.put_nowait(_END)

    async def _speak(self, turn, index, text, chunks, outstanding):
        tts = self.config.tts
        arguments = dict(tts.options, text=text)
        if self._voice is not None:
            arguments["voice"] = self._voice
        record = self._record(turn, "tts", tts.model, tts.method, index)
        try:
            stream = self._client.stream(tts.model, tts.method, priority=INTERACTIVE,
                                         arguments=arguments)
            try:
                async for value in stream:
                    chunks.put_nowait(chat_io.chunk_of(value))
            finally:
                await stream.aclose()
            self._ended(turn, record, "ok")
        except asyncio.CancelledError:
            self._ended(turn, record, "cancelled")
            raise
        except (ModelhostError, ValueError, KeyError) as exc:
            self._ended(turn, record, "error", exc)
            turn.errors.append("speech for sentence {} ({!r}): {}".format(index, text, exc))
        finally:
            outstanding.release()
            chunks.put_nowait(_END)

    async def _emit_speech(self, turn, slots, video):
        """Hand audio to the sink in sentence order, as it arrives; each sentence's whole
        audio then goes to the talking head."""
        try:
            while True:
                slot = await slots.get()
                if slot is _END:
                    break
                index, chunks = slot
                pcm, rate = bytearray(), None
                while True:
                    chunk = await chunks.get()
                    if chunk is _END:
                        break
                    if not self._emit(turn, "audio", index, chunk):
                        continue
                    if rate is None:
                        turn.spoken.append(turn.sentences[index])
                    turn.mark("first_audio")
                    rate = chunk.sample_rate
                    pcm += chunk.pcm
                    turn.audio_s += len(chunk.pcm) / 2.0 / chunk.sample_rate
                if video is not None and pcm:
                    video.put_nowait((index, chat_io.wav_bytes(pcm, rate)))
        finally:
            if video is not None:
                video.put_nowait(_END)

    async def _render(self, turn, video):
        """Each sentence's video, one after another, its segments to the sink as they come."""
        config = self.config.video
        while True:
            item = await video.get()
            if item is _END:
                return
            index, wav = item
            arguments = dict(config.options, audio=wav)
            if config.chain_frames:
                arguments["start_frame"] = self._next_frame
            record = self._record(turn, "video", config.model, config.method, index)
            frames = 0
            try:
                stream = self._client.stream(config.model, config.method, priority=INTERACTIVE,
                                             arguments=arguments)
                try:
                    async for value in stream:
                        frames = max(frames, int(value.get("frames") or 0))
                        segment = chat_io.VideoSegment(bytes(value["data"]), value.get("kind"),
                                                       value.get("index"))
                        if self._emit(turn, "video", index, segment):
                            turn.mark("first_video")
                            turn.video_segments += 1
                finally:
                    await stream.aclose()
                self._ended(turn, record, "ok")
            except asyncio.CancelledError:
                self._ended(turn, record, "cancelled")
                raise
            except (ModelhostError, ValueError, KeyError) as exc:
                self._ended(turn, record, "error", exc)
                turn.errors.append("video for sentence {}: {}".format(index, exc))
            finally:
                self._next_frame += frames

    # --- output, records, events -------------------------------------------------------

    def _emit(self, turn, kind, index, value):
        """Hand a piece of output to the sink if its turn may still speak."""
        with self._guard:
            if self._live != turn.id:
                return False
            getattr(self.sink, kind)(turn.id, index, value)
            return True

    def _record(self, turn, stage, model, method, sentence):
        record = CallRecord(stage, model, method, sentence, turn.now())
        turn.calls.append(record)
        self._event("call", turn, record=record)
        return record

    def _ended(self, turn, record, outcome, error=None):
        record.ended_s = turn.now()
        record.outcome = outcome
        record.error = None if error is None else str(error)
        self._event("call", turn, record=record)

    def _event(self, kind, turn, **fields):
        if self.on_event is None:
            return
        at = turn.now() if turn is not None else 0.0
        self.on_event(ChatEvent(kind, turn.id if turn is not None else None, at, fields))

    def _result(self, turn):
        total = turn.now()
        metrics = {"transcript_s": turn.marks.get("transcript"),
                   "first_token_s": turn.marks.get("first_token"),
                   "first_audio_s": turn.marks.get("first_audio"),
                   "first_video_s": turn.marks.get("first_video"),
                   "total_s": total}
        if "interrupted" in turn.marks:
            metrics["interrupted_s"] = turn.marks["interrupted"]
        outcome = "interrupted" if turn.cancelled else ("failed" if turn.errors else "done")
        return TurnResult(turn=turn.id, source=turn.source, transcript=turn.transcript,
                          reply=turn.reply, sentences=list(turn.sentences),
                          spoken=list(turn.spoken), outcome=outcome, errors=list(turn.errors),
                          metrics=metrics, files={}, calls=list(turn.calls),
                          audio_s=turn.audio_s, video_segments=turn.video_segments)

    def _remember(self, turn):
        if not turn.transcript:
            return
        said = turn.reply if not turn.cancelled else " ".join(turn.spoken)
        self._history += [{"role": "user", "content": turn.transcript},
                          {"role": "assistant", "content": said or "..."}]
        keep = 2 * max(0, self.config.history_turns)
        self._history = self._history[-keep:] if keep else []

    # --- the microphone ----------------------------------------------------------------

    async def listen(self, frames, sample_rate=None, on_turn=None):
        """Turns from a stream of 16-bit mono PCM frames (a microphone, or any async or plain
        iterable of bytes): speech is cut out by the voice detector and transcribed through
        an ASR streaming session while it is spoken; the user starting to speak interrupts
        the running turn. Each turn's result goes to on_turn as it ends; returns them all
        when the frames end."""
        if not self._started:
            await self.start()
        vad_config = self.config.vad
        rate = sample_rate or vad_config.sample_rate
        vad = chat_io.VoiceActivity(rate, vad_config.threshold_db, vad_config.margin_db,
                                    vad_config.start_s, vad_config.end_silence_s)
        preroll = collections.deque(maxlen=max(1, int(round(vad_config.preroll_s / 0.03))))
        utterance = None
        turns = []
        async for frame in _aiter(frames):
            decision = vad.feed(frame)
            if utterance is None:
                if decision == "start":
                    stopped = self.interrupt()  # the user speaks: the reply stops
                    self._event("speech", None, state="start", interrupted=stopped)
                    utterance = _Utterance(self, rate)
                    utterance.add(b"".join(preroll) + frame)
                    preroll.clear()
                else:
                    preroll.append(frame)
                continue
            utterance.add(frame)
            if decision == "end":
                turns.append(asyncio.ensure_future(self._heard(utterance, on_turn)))
                utterance = None
        if utterance is not None:
            turns.append(asyncio.ensure_future(self._heard(utterance, on_turn)))
        results = []
        for task in turns:
            try:
                result = await task
            except asyncio.CancelledError:
                continue
            if result is not None:
                results.append(result)
        return results

    async def _heard(self, utterance, on_turn):
        """The end of an utterance: its transcript, then a turn from it."""
        ended = time.monotonic()
        self._event("speech", None, state="end")
        text = await utterance.finish()
        if not text:
            self._event("notice", None, message="speech heard, but no words recognized")
            return None
        result = await self.run_turn(text=text, source="mic", started=ended,
                                     transcript_s=time.monotonic() - ended)
        if on_turn is not None:
            on_turn(result)
        return result


class _Utterance(object):
    """One stretch of speech: an ASR streaming session fed in order as frames come."""

    def __init__(self, chat, sample_rate):
        self._chat = chat
        self._rate = sample_rate
        self._pieces = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run())

    def add(self, pcm):
        self._pieces.put_nowait(bytes(pcm))

    async def finish(self):
        self._pieces.put_nowait(_END)
        return await self._task

    async def _run(self):
        client, asr = self._chat._client, self._chat.config.asr
        session = await client.call(asr.model, "stream_start", sample_rate=self._rate,
                                    priority=INTERACTIVE, **_language(asr))
        ended = False
        while not ended:
            # What arrived meanwhile goes in one call: fewer round trips, same order.
            pieces = [await self._pieces.get()]
            while not self._pieces.empty():
                pieces.append(self._pieces.get_nowait())
            if pieces[-1] is _END:
                ended = True
                pieces.pop()
            if pieces:
                await client.call(asr.model, "stream_feed", session=session,
                                  audio=b"".join(pieces), priority=INTERACTIVE)
        result = await client.call(asr.model, "stream_end", session=session,
                                   priority=INTERACTIVE)
        return (result.get("text") or "").strip()


def _language(asr):
    return {"language": asr.options["language"]} if "language" in asr.options else {}


async def _aiter(frames):
    if hasattr(frames, "__aiter__"):
        async for frame in frames:
            yield frame
        return
    iterator = iter(frames)
    loop = asyncio.get_running_loop()
    done = object()
    while True:
        # A microphone blocks on its device: read it off the loop.
        frame = await loop.run_in_executor(None, next, iterator, done)
        if frame is done:
            return
        yield frame


# --- the blocking face -------------------------------------------------------------------


class Chat(object):
    """The chat loop on a thread of its own; every method may be called from any thread.

        with Chat(ChatConfig(out_dir="out")) as chat:
            result = chat.turn(text="Hello!")        # blocks; Ctrl-C interrupts the turn
            future = chat.submit(text="And then?")   # returns at once
            chat.interrupt()                         # stops the running turn
    """

    def __init__(self, config=None, endpoint=None, sink=None, on_event=None):
        config = config or ChatConfig()
        if sink is None:
            sinks = []
            if config.out_dir:
                sinks.append(chat_io.FileSink(config.out_dir))
            if config.play:
                sinks.append(chat_io.Player())
            sink = chat_io.Sinks(sinks)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chat-loop",
                                        daemon=True)
        self._thread.start()
        self.core = None
        try:
            self.core = self._call(self._make(config, endpoint, sink, on_event))
        except BaseException:
            self._stop_loop()
            raise

    async def _make(self, config, endpoint, sink, on_event):
        core = AsyncChat(config, endpoint=endpoint, sink=sink, on_event=on_event)
        try:
            return await core.start()
        except BaseException:
            await core.aclose()
            raise

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, text=None, audio=None, sample_rate=None):
        """Start a turn (interrupting a running one); a concurrent.futures.Future of its
        TurnResult."""
        return asyncio.run_coroutine_threadsafe(
            self.core.run_turn(text=text, audio=audio, sample_rate=sample_rate), self._loop)

    def turn(self, text=None, audio=None, sample_rate=None):
        """Run a turn and wait for its TurnResult; Ctrl-C interrupts the turn (and returns its
        result, outcome 'interrupted')."""
        future = self.submit(text=text, audio=audio, sample_rate=sample_rate)
        try:
            return future.result()
        except KeyboardInterrupt:
            self.interrupt()
            return future.result()

    def interrupt(self):
        """Stop the running turn at once (see AsyncChat.interrupt); its id, or None."""
        return self.core.interrupt()

    def listen(self, frames, sample_rate=None, on_turn=None):
        """Run AsyncChat.listen on the loop; a Future of the list of turn results."""
        return asyncio.run_coroutine_threadsafe(
            self.core.listen(frames, sample_rate=sample_rate, on_turn=on_turn), self._loop)

    @property
    def live_turn(self):
        return self.core.live_turn

    def close(self):
        if self.core is not None:
            try:
                self._call(self.core.aclose())
            finally:
                self.core = None
                self._stop_loop()

    def _stop_loop(self):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


__all__ = ["AsyncChat", "CallRecord", "Chat", "ChatConfig", "ChatConfigError", "ChatEvent",
           "LLMConfig", "StageConfig", "TTSConfig", "TurnResult", "VADConfig", "VideoConfig",
           "VoiceRegistration", "load_config_file"]
