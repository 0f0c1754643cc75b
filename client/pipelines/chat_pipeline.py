"""The per-turn pipeline of the voice chat: the language model's reply streamed and cut
into sentences (_think), a TTS call per sentence with up to `lookahead` outstanding
(_submit_speech, _speak), the audio handed to the sink in sentence order
(_emit_speech), and each sentence's talking-head video (_render). It is a mixin of
chat.AsyncChat (moved out of it unchanged, issue 13): its methods use the loop's
client, configuration, output guard (_emit) and call records (_record, _ended).
"""

import asyncio

from modelhost import ModelhostError

from . import chat_io
from .chat_turn import _END, INTERACTIVE
from .llm import EchoReply, LLMError
from .sentences import SentenceSplitter


async def _until_end(queue):
    """The items put in one of the turn's queues, up to its _END."""
    while True:
        item = await queue.get()
        if item is _END:
            return
        yield item


class _TurnPipeline(object):
    """The LLM stream -> sentences -> TTS -> video steps of a turn (see the module docstring)."""

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
            async for index, text in _until_end(sentences):
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
            await self._stream_call(
                turn, record, arguments, lambda value: chunks.put_nowait(chat_io.chunk_of(value)),
                "speech for sentence {} ({!r})".format(index, text))
        finally:
            outstanding.release()
            chunks.put_nowait(_END)

    async def _stream_call(self, turn, record, arguments, on_value, what):
        """One streamed daemon call of the turn (the daemon and method its `record` names),
        each value to `on_value`; its outcome goes to the call records. A failure is one of
        the turn's errors, saying `what` failed, and ends only this call; cancellation
        ends the turn's task."""
        try:
            stream = self._client.stream(record.model, record.method, priority=INTERACTIVE,
                                         arguments=arguments)
            try:
                async for value in stream:
                    on_value(value)
            finally:
                await stream.aclose()
            self._ended(turn, record, "ok")
        except asyncio.CancelledError:
            self._ended(turn, record, "cancelled")
            raise
        except (ModelhostError, ValueError, KeyError) as exc:
            self._ended(turn, record, "error", exc)
            turn.errors.append("{}: {}".format(what, exc))

    async def _emit_speech(self, turn, slots, video):
        """Hand audio to the sink in sentence order, as it arrives; each sentence's whole
        audio then goes to the talking head."""
        try:
            async for index, chunks in _until_end(slots):
                pcm, rate = bytearray(), None
                async for chunk in _until_end(chunks):
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
        async for index, wav in _until_end(video):
            arguments = dict(config.options, audio=wav)
            if config.chain_frames:
                arguments["start_frame"] = self._next_frame
            record = self._record(turn, "video", config.model, config.method, index)
            frames = [0]

            def on_segment(value):
                frames[0] = max(frames[0], int(value.get("frames") or 0))
                segment = chat_io.VideoSegment(bytes(value["data"]), value.get("kind"),
                                               value.get("index"))
                if self._emit(turn, "video", index, segment):
                    turn.mark("first_video")
                    turn.video_segments += 1

            try:
                await self._stream_call(turn, record, arguments, on_segment,
                                        "video for sentence {}".format(index))
            finally:
                self._next_frame += frames[0]
