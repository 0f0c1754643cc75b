"""A real engine for tests: reports its interpreter, counts loads, echoes, sleeps, streams.

Runs inside the test daemons' venvs (Python 3.7/3.8 with numpy 1.x, 3.12 with
numpy 2.x) with only the stdlib, numpy if installed, and modelhost.
"""

import os
import sys
import time

from modelhost.daemons.engine import BadArguments, Engine, operation


class ProbeEngine(Engine):
    def __init__(self, load_seconds=0.0, **options):
        super(ProbeEngine, self).__init__(**options)
        self.load_seconds = load_seconds
        self.loads = 0
        self.calls = 0
        self.notes = []  # tags of `note` calls that really ran, in order

    def load(self):
        time.sleep(self.load_seconds)
        self.loads += 1

    def describe(self):
        return {"loads": self.loads}

    @operation
    def info(self, ctx):
        self.calls += 1
        try:
            import numpy
            numpy_version = numpy.__version__
        except ImportError:
            numpy_version = None
        return {"python": "{}.{}.{}".format(*sys.version_info[:3]),
                "executable": sys.executable, "prefix": sys.prefix, "numpy": numpy_version,
                "pid": os.getpid(), "loads": self.loads, "calls": self.calls}

    @operation
    def echo(self, ctx, data=None, **extra):
        return {"data": data, "extra": extra}

    @operation
    def echo_after(self, ctx, data=None, path: str = ""):
        """`data` back once `path` exists: a call that is surely running (its arguments
        received) while a test does something to it."""
        while path and not os.path.exists(path):
            ctx.check_cancelled()
            time.sleep(0.01)
        return data

    @operation
    def payload_owners(self, ctx, **values):
        """For each argument, the type of the object its bytes live in: "mmap" for what came
        in shared memory, "Frame" for a ZeroMQ frame, "bytes" for a copy."""
        return {name: _owner_type(value) for name, value in values.items()}

    @operation
    def add(self, ctx, a: int, b: int = 0):
        return a + b

    @operation
    def sleep(self, ctx, seconds: float, cooperative: bool = True):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if cooperative:
                ctx.check_cancelled()
            ctx.progress((seconds - (end - time.monotonic())) / seconds, "sleeping")
            time.sleep(min(0.02, max(0.0, end - time.monotonic())))
        return seconds

    @operation
    def count(self, ctx, n: int, size: int = 0, delay: float = 0.0):
        if n < 0:
            raise BadArguments("n must be >= 0")
        for index in range(n):
            ctx.check_cancelled()
            if delay:
                time.sleep(delay)
            yield {"index": index, "blob": bytes([index % 256]) * size}
        return {"sent": n}

    @operation
    def note(self, ctx, tag: str):
        self.notes.append(tag)
        return len(self.notes)

    @operation
    def noted(self, ctx):
        return list(self.notes)

    @operation
    def hold(self, ctx, megabytes: int):
        """Keep `megabytes` of real, touched memory until release()."""
        self.held = bytearray(megabytes * 2**20)
        for offset in range(0, len(self.held), 4096):
            self.held[offset] = 1  # touch every page so it is resident
        return len(self.held)

    @operation
    def release(self, ctx):
        self.held = None
        return 0

    @operation
    def wait_for_file(self, ctx, path: str, done: str = ""):
        """Return the contents of `path` once it exists; touch `done` just before returning,
        so a test knows the call is over without guessing a duration."""
        while not os.path.exists(path):
            ctx.check_cancelled()
            time.sleep(0.01)
        with open(path) as handle:
            text = handle.read()
        if done:
            open(done, "w").close()
        return text

    @operation
    def fail(self, ctx, message: str = "boom"):
        raise ValueError(message)

    @operation
    def crash(self, ctx):
        os._exit(17)

    @operation
    def crash_after_chunk(self, ctx, size: int):
        """Yield one chunk of `size` bytes, then die at once: whether the chunk left the
        process before it died is up to ZeroMQ's I/O thread."""
        yield b"c" * size
        os._exit(17)


def _owner_type(value):
    while getattr(value, "base", None) is not None:
        value = value.base  # an array's view chain, down to the buffer it was made on
    return type(getattr(value, "obj", value)).__name__


class NeedsWeightsEngine(ProbeEngine):
    """A probe engine that needs a weights directory, as the model daemons do."""

    @classmethod
    def preflight(cls, options):
        path = options.get("weights", "")
        if not os.path.isdir(path):
            return ["weights not found at {}: expected a directory holding model.pt "
                    "(see its README for where to download it)".format(path)]
        return []
