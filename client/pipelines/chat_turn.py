"""What a chat turn reports, and the turn's own state: CallRecord (one daemon call of a
turn and how it ended), TurnResult (a turn's outcome, reply, metrics, files),
ChatEvent (what on_event is told as the loop goes), and the loop's private pieces
shared by chat.py, chat_pipeline.py and chat_mic.py (_Turn, a turn's tasks and time
marks; _Interrupted; the queue end marker _END; the INTERACTIVE priority). Split out
of chat.py (issue 13); chat.py re-exports the public names.
"""

import asyncio
import dataclasses
import time
from typing import Optional

from modelhost import protocol

INTERACTIVE = protocol.Priority.INTERACTIVE

_END = object()  # the end of a queue's items


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
