"""Engines for bench/chat.py: the embedded default's speech engines with a realistic load
time, and a do-nothing speech engine.

- SlowLoadEspeak, SlowLoadPocketsphinx: the real espeak and PocketSphinx engines
  whose load() first sleeps `load_seconds` (3 s by default), standing in for
  reading model weights from disk (a CosyVoice or Whisper load takes seconds to
  a minute); their calls are the real engines' work.
- NullSpeechEngine: `tts` streams one 10 ms chunk of silence, `transcribe`
  returns a fixed text at once: a turn through it costs only modelhost and the
  chat loop.
"""

import time

from modelhost.daemons.asr.pocketsphinx_engine import PocketsphinxEngine
from modelhost.daemons.engine import Engine, operation
from modelhost.daemons.espeak.engine import EspeakEngine


class SlowLoadEspeak(EspeakEngine):
    def __init__(self, load_seconds=3.0, **options):
        super(SlowLoadEspeak, self).__init__(**options)
        self.load_seconds = load_seconds

    def load(self):
        time.sleep(self.load_seconds)
        super(SlowLoadEspeak, self).load()


class SlowLoadPocketsphinx(PocketsphinxEngine):
    def __init__(self, load_seconds=3.0, **options):
        super(SlowLoadPocketsphinx, self).__init__(**options)
        self.load_seconds = load_seconds

    @classmethod
    def preflight(cls, options):
        options = {key: value for key, value in options.items() if key != "load_seconds"}
        return super(SlowLoadPocketsphinx, cls).preflight(options)

    def load(self):
        time.sleep(self.load_seconds)
        super(SlowLoadPocketsphinx, self).load()


class NullSpeechEngine(Engine):
    SAMPLE_RATE = 22050

    @operation
    def tts(self, ctx, text, voice=None, rate=None, pitch=None):
        chunk = {"audio": b"\0\0" * (self.SAMPLE_RATE // 100), "sample_rate": self.SAMPLE_RATE}
        if getattr(ctx, "stream", False):
            return self._one(chunk)
        return dict(chunk, format="s16le", channels=1, samples=self.SAMPLE_RATE // 100)

    @staticmethod
    def _one(chunk):
        yield chunk
        return {"sample_rate": chunk["sample_rate"], "chunks": 1}

    @operation
    def transcribe(self, ctx, audio=None, sample_rate=None, language=None):
        return {"text": "what is two plus two", "language": "en", "duration_s": 0.0,
                "segments": [], "words": []}
