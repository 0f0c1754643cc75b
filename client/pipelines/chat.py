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

The pieces live in modules of their own (issue 13): chat_config.py (ChatConfig
and its parsing), chat_turn.py (TurnResult, CallRecord, ChatEvent, a turn's
state), chat_pipeline.py (the per-turn LLM -> sentences -> TTS -> video steps),
chat_mic.py (listen: the microphone's turns). This module keeps AsyncChat (the
lifecycle, a turn's start and end, the interruption guard, records and events),
Chat, and re-exports the public names.
"""

import asyncio
import os
import threading
import time

from modelhost import AsyncClient, ModelhostError

from . import chat_io
from .chat_config import (ChatConfig, ChatConfigError, StageConfig, TTSConfig,  # noqa: F401
                          VADConfig, VideoConfig, VoiceRegistration, load_config_file)
from .chat_mic import _Microphone
from .chat_pipeline import _TurnPipeline
from .chat_turn import INTERACTIVE, CallRecord, ChatEvent, TurnResult, _Interrupted, _Turn
from .llm import EchoReply, LLMConfig, make_reply_source  # noqa: F401


# --- the loop -------------------------------------------------------------------------


class AsyncChat(_TurnPipeline, _Microphone):
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
