"""The voice chat's microphone: AsyncChat.listen (speech cut out of a stream of PCM
frames by the voice detector, each utterance transcribed through an ASR streaming
session while it is spoken, the user starting to speak interrupting the running turn)
as a mixin of chat.AsyncChat, with _Utterance (one utterance's streaming session) and
_aiter (frames from an async or blocking iterable). Moved out of chat.py unchanged
(issue 13).
"""

import asyncio
import collections
import time

from . import chat_io
from .chat_turn import _END, INTERACTIVE


class _Microphone(object):
    """AsyncChat's listen() and its helpers (see the module docstring)."""

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
