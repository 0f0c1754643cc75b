"""Helpers for the model daemons: speech, sound, talking heads and transcripts as plain values.

    with Client() as client:
        speech = client.tts("Hello there.", voice="narrator")      # Audio, 24 kHz mono
        speech.write("hello.wav")
        sfx = client.text_to_audio("rain on a tin roof", duration=8, seed=7)   # 44.1 kHz stereo
        video = client.talking_head(open("hello.wav", "rb").read())            # mp4 bytes
        client.transcribe("hello.wav")["text"]                                 # speech to text

Each helper is one call of the daemon's operation (see daemons/<name>/README.md
for every argument) with the daemon name as a keyword (`model=`), since a host
may serve several (one TalkingGaussian daemon per subject). Audio comes back as
`Audio` (float32 samples and their rate); writing files uses soundfile, imported
only when asked. Prompt audio may be given as file bytes or a path.

Runs on Python 3.7; needs numpy for the arrays (soundfile only for Audio.write).
"""

import collections
import os

from . import protocol
from ._messages import NOT_SET

TTS_MODEL = "cosyvoice"
TEXT_TO_AUDIO_MODEL = "tangoflux"
TALKING_HEAD_MODEL = "talkinggaussian"
ASR_MODEL = "asr"


class Audio(collections.namedtuple("Audio", "samples sample_rate info")):
    """float32 samples, shape (n,) for mono or (n, channels), their sample rate, and the
    rest of what the daemon said (`info`: e.g. the seed it used)."""

    __slots__ = ()

    @property
    def seconds(self):
        return len(self.samples) / float(self.sample_rate)

    def write(self, path, subtype="PCM_16"):
        """Write a WAV/FLAC/OGG file (by the path's suffix) with soundfile."""
        try:
            import soundfile
        except ImportError:
            raise ImportError("writing audio files needs soundfile: pip install soundfile "
                              "(or modelhost[host])")

        soundfile.write(str(path), self.samples, self.sample_rate, subtype=subtype)
        return path


def audio_bytes(value):
    """File bytes for an audio argument given as bytes or as a path to a file."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as handle:
            return handle.read()
    raise TypeError("audio must be the bytes of a WAV/FLAC file or a path to one, not {}"
                    .format(type(value).__name__))


def _transcribe_arguments(audio, sample_rate, language):
    """transcribe's arguments: Audio, an array or raw 16-bit PCM bytes need a rate; a file's
    bytes or a path carry their own."""
    arguments = _given(sample_rate=sample_rate, language=language)
    if isinstance(audio, Audio):
        arguments["audio"] = audio.samples
        arguments.setdefault("sample_rate", audio.sample_rate)
    elif type(audio).__name__ == "ndarray":
        arguments["audio"] = audio
    else:
        arguments["audio"] = audio_bytes(audio)
    return arguments


def _audio(result):
    info = {key: value for key, value in result.items() if key not in ("audio", "sample_rate")}
    return Audio(result["audio"], result["sample_rate"], info)


def _given(**arguments):
    """The arguments the caller set: the daemon's defaults stand for the rest."""
    return {name: value for name, value in arguments.items() if value is not NOT_SET}


def _tts_arguments(text, voice, mode, prompt_audio, prompt_text, instruct_text, speed):
    arguments = _given(text=text, voice=voice, mode=mode, prompt_text=prompt_text,
                       instruct_text=instruct_text, speed=speed)
    if prompt_audio is not NOT_SET:
        arguments["prompt_audio"] = audio_bytes(prompt_audio)
    return arguments


class ModelCalls(object):
    """Mixed into Client: `call` and `stream` do the work."""

    def tts(self, text, *, voice=NOT_SET, mode=NOT_SET, prompt_audio=NOT_SET,
            prompt_text=NOT_SET, instruct_text=NOT_SET, speed=NOT_SET,
            model=TTS_MODEL, priority=protocol.Priority.INTERACTIVE, timeout=NOT_SET):
        """Speech for `text` (CosyVoice2) as Audio at 24 kHz.

        Modes: "zero_shot" (prompt_audio + prompt_text, or a registered
        `voice`), "cross_lingual" (prompt_audio), "instruct" (instruct_text and
        a voice or prompt audio), "sft" (a built-in speaker as `voice`).
        """
        result = self.call(model, "tts", priority=priority, arguments=_tts_arguments(
            text, voice, mode, prompt_audio, prompt_text, instruct_text, speed),
            timeout=timeout)
        return _audio(result)

    def tts_stream(self, text, *, voice=NOT_SET, mode=NOT_SET, prompt_audio=NOT_SET,
                   prompt_text=NOT_SET, instruct_text=NOT_SET, speed=NOT_SET,
                   model=TTS_MODEL, priority=protocol.Priority.INTERACTIVE,
                   timeout=NOT_SET):
        """Speech as it is made: yields Audio chunks (24 kHz) in order, for playback that
        starts before the sentence is done."""
        arguments = _tts_arguments(text, voice, mode, prompt_audio, prompt_text,
                                   instruct_text, speed)
        arguments["stream"] = True
        stream = self.stream(model, "tts", priority=priority, arguments=arguments,
                             timeout=timeout)
        for chunk in stream:
            yield _audio(chunk)

    def register_voice(self, voice_id, prompt_audio, prompt_text, *, model=TTS_MODEL,
                       timeout=NOT_SET):
        """Register a voice once; `tts(..., voice=voice_id)` reuses it without its audio."""
        return self.call(model, "register_voice", arguments={
            "voice_id": voice_id, "prompt_audio": audio_bytes(prompt_audio),
            "prompt_text": prompt_text}, timeout=timeout)

    def text_to_audio(self, prompt, *, duration=NOT_SET, steps=NOT_SET,
                      guidance_scale=NOT_SET, seed=NOT_SET, model=TEXT_TO_AUDIO_MODEL,
                      priority=protocol.Priority.BATCH, on_progress=None,
                      timeout=NOT_SET):
        """Sound for a text prompt (TangoFlux) as Audio at 44.1 kHz, stereo (n, 2).

        `.info["seed"]` is the seed the daemon used (a random one when none
        was given): pass it again to get the same sound.
        """
        result = self.call(model, "generate", priority=priority, on_progress=on_progress,
                           arguments=_given(prompt=prompt, duration=duration, steps=steps,
                                            guidance_scale=guidance_scale, seed=seed),
                           timeout=timeout)
        return _audio(result)

    def talking_head(self, audio, *, model=TALKING_HEAD_MODEL,
                     priority=protocol.Priority.NORMAL, on_progress=None, timeout=NOT_SET):
        """An mp4 (bytes, with the audio as its sound) of the daemon's subject saying `audio`
        (WAV/FLAC bytes or a path). One daemon per subject: `model` names it."""
        result = self.call(model, "render", priority=priority, on_progress=on_progress,
                           arguments={"audio": audio_bytes(audio)}, timeout=timeout)
        return bytes(result["video"])


    def transcribe(self, audio, *, sample_rate=NOT_SET, language=NOT_SET, model=ASR_MODEL,
                   priority=protocol.Priority.INTERACTIVE, on_progress=None, timeout=NOT_SET):
        """The text of `audio`: a WAV/FLAC file's bytes or path, an Audio, a numpy array (with
        sample_rate) or raw 16-bit mono PCM bytes (with sample_rate).

        Returns the daemon's map: {"text", "language", "duration_s", "segments":
        [{"start", "end", "text"}], "words": [{"start", "end", "word"}]} (seconds).
        """
        return self.call(model, "transcribe", priority=priority, on_progress=on_progress,
                         arguments=_transcribe_arguments(audio, sample_rate, language),
                         timeout=timeout)


class AsyncModelCalls(object):
    """The same helpers for AsyncClient: await them (tts_stream: async for)."""

    async def tts(self, text, *, voice=NOT_SET, mode=NOT_SET, prompt_audio=NOT_SET,
                  prompt_text=NOT_SET, instruct_text=NOT_SET, speed=NOT_SET,
                  model=TTS_MODEL, priority=protocol.Priority.INTERACTIVE, timeout=NOT_SET):
        return _audio(await self.call(model, "tts", priority=priority, arguments=_tts_arguments(
            text, voice, mode, prompt_audio, prompt_text, instruct_text, speed),
            timeout=timeout))

    async def tts_stream(self, text, *, voice=NOT_SET, mode=NOT_SET,
                         prompt_audio=NOT_SET, prompt_text=NOT_SET,
                         instruct_text=NOT_SET, speed=NOT_SET, model=TTS_MODEL,
                         priority=protocol.Priority.INTERACTIVE, timeout=NOT_SET):
        arguments = _tts_arguments(text, voice, mode, prompt_audio, prompt_text,
                                   instruct_text, speed)
        arguments["stream"] = True
        async for chunk in self.stream(model, "tts", priority=priority, arguments=arguments,
                                       timeout=timeout):
            yield _audio(chunk)

    async def register_voice(self, voice_id, prompt_audio, prompt_text, *, model=TTS_MODEL,
                             timeout=NOT_SET):
        return await self.call(model, "register_voice", arguments={
            "voice_id": voice_id, "prompt_audio": audio_bytes(prompt_audio),
            "prompt_text": prompt_text}, timeout=timeout)

    async def text_to_audio(self, prompt, *, duration=NOT_SET, steps=NOT_SET,
                            guidance_scale=NOT_SET, seed=NOT_SET,
                            model=TEXT_TO_AUDIO_MODEL, priority=protocol.Priority.BATCH,
                            on_progress=None, timeout=NOT_SET):
        return _audio(await self.call(
            model, "generate", priority=priority, on_progress=on_progress,
            arguments=_given(prompt=prompt, duration=duration, steps=steps,
                             guidance_scale=guidance_scale, seed=seed),
            timeout=timeout))

    async def talking_head(self, audio, *, model=TALKING_HEAD_MODEL,
                           priority=protocol.Priority.NORMAL, on_progress=None,
                           timeout=NOT_SET):
        result = await self.call(model, "render", priority=priority, on_progress=on_progress,
                                 arguments={"audio": audio_bytes(audio)},
                                 timeout=timeout)
        return bytes(result["video"])

    async def transcribe(self, audio, *, sample_rate=NOT_SET, language=NOT_SET,
                         model=ASR_MODEL, priority=protocol.Priority.INTERACTIVE,
                         on_progress=None, timeout=NOT_SET):
        return await self.call(model, "transcribe", priority=priority, on_progress=on_progress,
                               arguments=_transcribe_arguments(audio, sample_rate, language),
                               timeout=timeout)
