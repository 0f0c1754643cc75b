"""A STAND-IN for the text-to-audio daemon (TangoFlux) that really synthesizes sound, for the
audio drama's tests (tests/test_drama.py) through `modelhost up`.

No model: `generate` has TangoFlux's signature and argument checks (the
engine's own `check_arguments`) and answers like it (float32 [samples, 2] at
44.1 kHz, the seed it used), with sound made from the prompt:

- a call for more than `burst_below_s` seconds is an ambience: stereo noise,
  band-passed around a centre frequency picked by the prompt's hash, the two
  channels decorrelated, stationary (so a level measured anywhere in it is
  its level);
- a shorter call is an effect: `lead_s` of silence, then a tone burst (a
  sine at a frequency picked by the prompt's hash, 5 ms attack, 60 ms decay
  constant, `burst_s` long), then silence: a sharp onset to find.

Test hooks: a prompt containing "[fail]" always raises; one containing
"[flaky]" raises on its first call in this process, then works. Each call is
appended to `calls_log` (JSON lines: prompt, seed, pid), so tests count them.
`call_s` pads each call to that long (progress is reported along the way).
"""

import hashlib
import json
import os
import time

import numpy

from modelhost.daemons.engine import Engine, operation
from modelhost.daemons.tangoflux.engine import (CHANNELS, DEFAULT_DURATION, DEFAULT_GUIDANCE,
                                                DEFAULT_STEPS, SAMPLE_RATE, check_arguments)


def _hash(prompt):
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16)


class AmbienceStandInEngine(Engine):
    def __init__(self, burst_below_s=3.0, lead_s=0.1, burst_s=0.35, call_s=0.0, calls_log=None,
                 **options):
        super(AmbienceStandInEngine, self).__init__(**options)
        self.burst_below_s = float(burst_below_s)
        self.lead_s = float(lead_s)
        self.burst_s = float(burst_s)
        self.call_s = float(call_s)
        self.calls_log = calls_log
        self.sample_rate = SAMPLE_RATE
        self._flaky_seen = set()

    def describe(self):
        return {"engine": "ambience stand-in", "sample_rate": self.sample_rate}

    @operation
    def generate(self, ctx, prompt: str, duration: float = DEFAULT_DURATION,
                 steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 seed=None):
        """STAND-IN sound for a prompt: a noise bed (ambience) or a tone burst (effect)."""
        prompt, duration, steps, guidance_scale, seed = check_arguments(
            prompt, duration, steps, guidance_scale, seed)
        if seed is None:
            seed = _hash(prompt) % 2**31
        started = time.monotonic()
        if self.calls_log:
            with open(self.calls_log, "a") as handle:
                handle.write(json.dumps({"prompt": prompt, "seed": seed, "pid": os.getpid()})
                             + "\n")
        if "[fail]" in prompt:
            raise RuntimeError("stand-in: this prompt always fails ([fail] in it)")
        if "[flaky]" in prompt and prompt not in self._flaky_seen:
            self._flaky_seen.add(prompt)
            raise RuntimeError("stand-in: this prompt fails once ([flaky] in it)")
        shown = min(steps, 5)
        for step in range(shown):
            ctx.check_cancelled()
            ctx.progress(step / float(shown), "diffusion")
            left = started + self.call_s * (step + 1) / shown - time.monotonic()
            if left > 0:
                time.sleep(left)
        frames = int(round(duration * self.sample_rate))
        rng = numpy.random.default_rng([seed, _hash(prompt)])
        if duration > self.burst_below_s:
            audio = self._bed(prompt, frames, rng)
        else:
            audio = self._burst(prompt, frames)
        ctx.progress(1.0, "decode")
        return {"audio": audio, "sample_rate": self.sample_rate, "channels": CHANNELS,
                "samples": frames, "duration": frames / float(self.sample_rate),
                "seed": seed, "steps": steps, "guidance_scale": guidance_scale}

    def _bed(self, prompt, frames, rng):
        """Band-passed stereo noise, centre 200..3000 Hz by the prompt's hash."""
        centre = 200.0 + _hash(prompt + "#centre") % 2800
        width = centre * 0.8
        noise = rng.standard_normal((frames, CHANNELS))
        spectrum = numpy.fft.rfft(noise, axis=0)
        freqs = numpy.fft.rfftfreq(frames, 1.0 / self.sample_rate)
        shape = numpy.exp(-0.5 * ((freqs - centre) / width) ** 2)
        bed = numpy.fft.irfft(spectrum * shape[:, None], n=frames, axis=0)
        bed *= 0.1 / max(1e-9, float(numpy.sqrt((bed ** 2).mean())))
        return numpy.ascontiguousarray(bed, dtype=numpy.float32)

    def _burst(self, prompt, frames):
        """lead_s of silence, then a decaying sine burst of burst_s at 300..1500 Hz."""
        frequency = 300.0 + _hash(prompt + "#tone") % 1200
        audio = numpy.zeros((frames, CHANNELS), dtype=numpy.float32)
        lead = int(round(self.lead_s * self.sample_rate))
        length = min(frames - lead, int(round(self.burst_s * self.sample_rate)))
        if length <= 0:
            return audio
        t = numpy.arange(length) / float(self.sample_rate)
        envelope = numpy.minimum(1.0, t / 0.005) * numpy.exp(-t / 0.06)
        tone = 0.5 * envelope * numpy.sin(2 * numpy.pi * frequency * t)
        audio[lead:lead + length] = tone[:, None]
        return audio
