"""A bench-only engine for bench/drama.py: a StageEngine (real memory, timed tier moves) that
answers the audio drama's two operations.

There is no model: each call sleeps `call_s` (the STAND-IN for the model's
work, checking for cancellation and reporting progress), then returns audio
made on the spot, so that the pipeline's timeline and mix run on real arrays.

- tts(ctx, text, voice=None, **extra): like espeak's answer (int16 mono PCM
  as s16le bytes at 22050 Hz), `seconds_per_char` of noise shaped by a 4 Hz
  syllable envelope per character of text;
- generate(ctx, prompt, duration, steps, guidance_scale, seed): like
  TangoFlux's (float32 [samples, 2] at 44100 Hz), `duration` of noise.
"""

import time
import zlib

import numpy

from modelhost.daemons.engine import operation
from stage_engine import StageEngine

TTS_RATE = 22050
SFX_RATE = 44100


class DramaEngine(StageEngine):
    def __init__(self, call_s=0.2, seconds_per_char=0.06, **options):
        super(DramaEngine, self).__init__(**options)
        self.call_s = float(call_s)
        self.seconds_per_char = float(seconds_per_char)

    def _work(self, ctx):
        """The stand-in for the model's work: call_s, cancellable, with progress."""
        started = time.monotonic()
        end = started + self.call_s
        while True:
            ctx.check_cancelled()
            left = end - time.monotonic()
            if left <= 0:
                return
            ctx.progress((self.call_s - left) / max(self.call_s, 1e-9), self.name)
            time.sleep(min(0.05, left))

    @operation
    def tts(self, ctx, text, voice=None, **extra):
        self._work(ctx)
        rng = numpy.random.default_rng(zlib.crc32(text.encode("utf-8")))
        frames = max(1, int(len(text) * self.seconds_per_char * TTS_RATE))
        t = numpy.arange(frames) / float(TTS_RATE)
        envelope = 0.5 + 0.5 * numpy.sin(2 * numpy.pi * 4.0 * t) ** 2
        audio = (3000 * envelope * rng.standard_normal(frames)).clip(-32767, 32767)
        pcm = audio.astype("<i2").tobytes()
        return {"audio": pcm, "sample_rate": TTS_RATE, "format": "s16le", "channels": 1,
                "samples": frames}

    @operation
    def generate(self, ctx, prompt, duration=10.0, steps=50, guidance_scale=4.5, seed=None):
        self._work(ctx)
        rng = numpy.random.default_rng([int(seed or 0), zlib.crc32(prompt.encode("utf-8"))])
        frames = int(float(duration) * SFX_RATE)
        audio = (0.1 * rng.standard_normal((frames, 2))).astype(numpy.float32)
        return {"audio": audio, "sample_rate": SFX_RATE, "channels": 2, "samples": frames,
                "duration": frames / float(SFX_RATE), "seed": seed, "steps": steps,
                "guidance_scale": guidance_scale}
