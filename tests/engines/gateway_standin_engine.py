"""A TTS STAND-IN for the gateway's tests: espeak's `tts` signature and chunks, with gates.

`tts(text, voice, rate, pitch)` streams `chunks` chunks of 0.1 s of a 440 Hz
tone (s16le, 22050 Hz, mono, as espeak's). A text can hold the call at a gate
until the test opens it (creates the file `<gate_dir>/<name>`), so a test can
see what the gateway sent meanwhile without any timing:

    "wait-before:NAME ..."   waits before the first chunk
    "wait-after:NAME ..."    sends the first chunk, then waits

Every call appends its events to `<gate_dir>/events.log`, one a line:
`start TEXT`, `chunk I`, `waiting NAME`, `end ok|cancelled|closed|error`. A wait
checks for cancellation, so a cancelled call ends as `cancelled`.
"""

import math
import os
import struct
import time

from modelhost.daemons.engine import BadArguments, Cancelled, Engine, operation

RATE = 22050
CHUNK_S = 0.1


def _tone(index, samples):
    start = index * samples
    return b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * (start + i) / RATE)))
                    for i in range(samples))


class GatewayStandInEngine(Engine):
    def __init__(self, gate_dir, chunks=4, fail_load=False, **options):
        super(GatewayStandInEngine, self).__init__(gate_dir=gate_dir, chunks=chunks,
                                                   fail_load=fail_load, **options)
        self.gate_dir = gate_dir
        self.chunks = chunks
        self.fail_load = fail_load

    def load(self):
        if self.fail_load:
            raise RuntimeError("the stand-in was told to fail its load (fail_load: true)")

    def _log(self, line):
        with open(os.path.join(self.gate_dir, "events.log"), "a") as handle:
            handle.write(line + "\n")

    def _wait(self, ctx, name):
        self._log("waiting " + name)
        path = os.path.join(self.gate_dir, name)
        while not os.path.exists(path):
            ctx.check_cancelled()
            time.sleep(0.01)

    @operation
    def transcribe(self, ctx, audio=None, sample_rate=None, language=None):
        """A fixed transcript; language "wait:NAME" holds the call at gate NAME first."""
        self._log("start transcribe")
        try:
            if isinstance(language, str) and language.startswith("wait:"):
                self._wait(ctx, language.split(":", 1)[1])
        except Cancelled:
            self._log("end cancelled")
            raise
        self._log("end ok")
        return {"text": "stand in", "language": "en", "duration_s": 1.0,
                "segments": [{"start": 0.0, "end": 1.0, "text": "stand in"}],
                "words": [{"start": 0.0, "end": 0.5, "word": "stand"},
                          {"start": 0.5, "end": 1.0, "word": "in"}]}

    @operation
    def voices(self, ctx):
        return ["standin-a", "standin-b"]

    @operation
    def tts(self, ctx, text, voice=None, rate=None, pitch=None):
        if not isinstance(text, str) or not text.strip():
            raise BadArguments("tts: text is empty")
        if voice not in (None, "standin-a", "standin-b"):
            raise BadArguments("tts: unknown voice {!r}; valid voices: standin-a, standin-b"
                               .format(voice))
        self._log("start " + text)
        gate = text.split(" ", 1)[0]

        def generate():
            samples = int(RATE * CHUNK_S)
            try:
                if gate.startswith("wait-before:"):
                    self._wait(ctx, gate.split(":", 1)[1])
                for index in range(self.chunks):
                    ctx.check_cancelled()
                    self._log("chunk {}".format(index))
                    yield {"audio": _tone(index, samples), "sample_rate": RATE}
                    if index == 0 and gate.startswith("wait-after:"):
                        self._wait(ctx, gate.split(":", 1)[1])
            except Cancelled:
                self._log("end cancelled")
                raise
            except GeneratorExit:  # the runtime stopped iterating: a cancel after a chunk
                self._log("end closed")
                raise
            except BaseException:
                self._log("end error")
                raise
            self._log("end ok")
            return {"sample_rate": RATE, "format": "s16le", "channels": 1,
                    "samples": samples * self.chunks, "chunks": self.chunks}

        if getattr(ctx, "stream", False):
            return generate()
        chunks = list(generate())
        return {"audio": b"".join(c["audio"] for c in chunks), "sample_rate": RATE,
                "format": "s16le", "channels": 1}
