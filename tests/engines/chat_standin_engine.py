"""Real engines with a gate, for the chat loop's tests: a call can be held mid-stream.

- GatedEspeakEngine: the real espeak engine; a streamed `tts` call whose text
  contains `hold_text` yields its first chunk, then waits while the file
  `<gate_dir>/hold-tts` exists (until it is removed, or the call is cancelled).
- GatedTalkingHeadEngine: the TalkingGaussian stand-in engine; a streamed
  `render` yields its first segment, then waits while `<gate_dir>/hold-video`
  exists.

While a call waits, `<gate_dir>/held-tts` (or `held-video`) holds the text (or
the call's request id), so a test waits for the file instead of sleeping;
each call that ended by a cancel appends a line to `<gate_dir>/cancelled`.
The gate is a file so that a test steers a daemon process without a socket.
"""

import os
import time

from modelhost.daemons.engine import Cancelled, operation
from modelhost.daemons.espeak.engine import EspeakEngine

from talkinggaussian_standin_engine import StandinTalkingGaussianEngine


def _hold(ctx, gate_dir, name, what):
    held = os.path.join(gate_dir, "held-" + name)
    with open(held, "w") as handle:
        handle.write(what)
    try:
        while os.path.exists(os.path.join(gate_dir, "hold-" + name)):
            ctx.check_cancelled()
            time.sleep(0.005)
    except Cancelled:
        with open(os.path.join(gate_dir, "cancelled"), "a") as handle:
            handle.write("{} {}\n".format(name, what))
        raise
    finally:
        if os.path.exists(held):
            os.unlink(held)


def _gated(generator, ctx, gate_dir, name, what):
    """Yield the first item, hold while the gate is closed, then the rest; keep the result."""
    first = True
    while True:
        try:
            item = next(generator)
        except StopIteration as stop:
            return stop.value
        yield item
        if first:
            first = False
            try:
                _hold(ctx, gate_dir, name, what)
            except Cancelled:
                generator.close()
                raise


class GatedEspeakEngine(EspeakEngine):
    def __init__(self, gate_dir, hold_text="HOLD", **options):
        super(GatedEspeakEngine, self).__init__(**options)
        self.gate_dir = gate_dir
        self.hold_text = hold_text

    @operation
    def tts(self, ctx, text, voice=None, rate=None, pitch=None):
        result = super(GatedEspeakEngine, self).tts(ctx, text, voice=voice, rate=rate,
                                                    pitch=pitch)
        if getattr(ctx, "stream", False) and self.hold_text in text:
            return _gated(result, ctx, self.gate_dir, "tts", text)
        return result


class GatedTalkingHeadEngine(StandinTalkingGaussianEngine):
    def __init__(self, gate_dir, **options):
        super(GatedTalkingHeadEngine, self).__init__(**options)
        self.gate_dir = gate_dir

    @classmethod
    def preflight(cls, options):
        options = {key: value for key, value in options.items() if key != "gate_dir"}
        return super(GatedTalkingHeadEngine, cls).preflight(options)

    @operation
    def render(self, ctx, audio: bytes, start_frame: int = 0):
        result = super(GatedTalkingHeadEngine, self).render(ctx, audio, start_frame=start_frame)
        if getattr(ctx, "stream", False):
            return _gated(result, ctx, self.gate_dir, "video", str(start_frame))
        return result
