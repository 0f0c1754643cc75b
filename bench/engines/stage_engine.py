"""A bench-only engine that stands in for one stage of a generative pipeline (bench/scheduling.py).

It holds real memory, so that what the broker probes (and what the bench
samples from outside with psutil) really moves, and it takes time to move
between tiers, so that a policy that moves weights often pays for it. There
is no model here: every figure is a stand-in, named as such below.

- load(): touches `resident_mib` of numpy memory (numpy.ones writes every
  page, so the process's RSS grows by that much), then sleeps until `load_s`
  has passed since the load began. The sleep is the STAND-IN for reading
  weights from disk and moving them to the device.
- unload(): drops the array (the runtime then collects garbage and trims the
  C heap, so the RSS really falls).
- offload(): writes the array to a file in `offload_dir` and frees it, then
  sleeps until `offload_s` has passed: a STAND-IN for "weights from the
  device to host RAM" on a machine whose probed device IS host RAM (no GPU:
  the broker probes host memory, so parking the weights in host RAM would
  free nothing it can see; a file does).
- onload(): reads the file back (the RSS grows again), padded to `onload_s`:
  the stand-in for "host RAM back to the device".
- run(ctx, seconds, peak_mib=0): the work of one call: touches `peak_mib`
  more for `seconds` (activations at the call's peak), sleeping in small
  steps, checking for cancellation and reporting progress.

Every tier move is appended to `events` (a JSON-lines file, one per bench
policy, shared by the daemons), so that the bench can count loads, offloads
and onloads per daemon independently of `modelhost ps`.
"""

import json
import os
import shutil
import tempfile
import time

import numpy

from modelhost.daemons.engine import BadArguments, Engine, operation

MiB = 2**20
STEP_S = 0.02  # how often run() checks for cancellation
PROGRESS_EVERY_S = 0.25


def _touched(mebibytes):
    # numpy.ones writes every byte, so every page is resident, not just reserved.
    return numpy.ones(int(mebibytes) * MiB, dtype=numpy.uint8)


def _pad(started, seconds):
    left = started + float(seconds) - time.monotonic()
    if left > 0:
        time.sleep(left)


class StageEngine(Engine):
    def __init__(self, name="stage", resident_mib=64, load_s=0.0, offload_s=0.0, onload_s=0.0,
                 offload_dir=None, events=None, **options):
        super(StageEngine, self).__init__(**options)
        self.name = str(name)
        self.resident_mib = int(resident_mib)
        self.load_s = float(load_s)
        self.offload_s = float(offload_s)
        self.onload_s = float(onload_s)
        self.offload_dir = offload_dir
        self._made_dir = None
        self.events = events
        self.weights = None
        self.counts = {"load": 0, "unload": 0, "offload": 0, "onload": 0}

    # --- bookkeeping -----------------------------------------------------------

    def _event(self, kind, started):
        self.counts[kind] += 1
        if not self.events:
            return
        line = json.dumps({"daemon": self.name, "event": kind, "pid": os.getpid(),
                           "at": time.time(), "took_s": time.monotonic() - started})
        # One short O_APPEND write per event: lines from several daemons do not interleave.
        with open(self.events, "a") as handle:
            handle.write(line + "\n")

    def _offload_path(self):
        if self.offload_dir is None:
            self.offload_dir = self._made_dir = tempfile.mkdtemp(prefix="mh-stage-")
        return os.path.join(self.offload_dir, "{}-{}.npy".format(self.name, os.getpid()))

    # --- tiers -------------------------------------------------------------------

    def load(self):
        """Touch `resident_mib`; the sleep up to `load_s` stands in for reading weights from disk."""
        started = time.monotonic()
        self.weights = _touched(self.resident_mib)
        _pad(started, self.load_s)
        self._event("load", started)

    def unload(self):
        started = time.monotonic()
        self.weights = None
        if self.offload_dir is not None and os.path.exists(self._offload_path()):
            os.remove(self._offload_path())  # unloaded while offloaded
        if self._made_dir is not None:
            shutil.rmtree(self._made_dir, ignore_errors=True)
            self.offload_dir = self._made_dir = None
        self._event("unload", started)

    def offload(self):
        """Stand-in for "weights to host RAM": to a file, so the probed memory really drops."""
        started = time.monotonic()
        numpy.save(self._offload_path(), self.weights)
        self.weights = None
        _pad(started, self.offload_s)
        self._event("offload", started)

    def onload(self):
        """Stand-in for "weights back to the device": read back from the file."""
        started = time.monotonic()
        path = self._offload_path()
        self.weights = numpy.load(path)
        os.remove(path)
        _pad(started, self.onload_s)
        self._event("onload", started)

    def describe(self):
        return {"stage": self.name, "resident_mib": self.resident_mib, "load_s": self.load_s}

    # --- operations --------------------------------------------------------------

    @operation
    def run(self, ctx, seconds: float, peak_mib: int = 0):
        """One call: hold `peak_mib` more for `seconds`, checking for cancellation."""
        if seconds < 0 or peak_mib < 0:
            raise BadArguments("seconds and peak_mib must be >= 0")
        started = time.monotonic()
        extra = _touched(peak_mib) if peak_mib else None
        end = started + seconds
        next_progress = started
        while True:
            ctx.check_cancelled()
            now = time.monotonic()
            left = end - now
            if left <= 0:
                break
            if now >= next_progress and seconds >= 2 * PROGRESS_EVERY_S:
                ctx.progress((now - started) / seconds, self.name)
                next_progress = now + PROGRESS_EVERY_S
            time.sleep(min(STEP_S, left))
        del extra
        return {"pid": os.getpid(), "stage": self.name, "took_s": time.monotonic() - started,
                "resident_mib": None if self.weights is None else self.weights.nbytes // MiB}
