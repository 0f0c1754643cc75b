"""Test engines that really hold memory, so that tiers and memory reports can be checked.

On a machine without a GPU the broker probes host memory, so "the device" is
host RAM here: load() allocates `resident_mib` of touched numpy memory (the
process's RSS grows by that much), and offload() is a *stand-in* for "weights
to host RAM": it writes the array to a file in `offload_dir` and frees it, so
the probed memory really drops; onload() reads it back.

Two classes, because the runtime offers the offloaded tier by whether the
class defines offload() and onload():
- MemoryEngineNoOffload: load, unload and the operations;
- MemoryEngine: the same plus offload/onload.

Options: resident_mib (int), leak_on_unload (bool: unload() "forgets" to
free, keeping a hidden reference, so a probe sees nothing come back),
offload_dir (str, default a fresh temporary directory), fail_loads (int:
that many first load() calls raise, to test failed loads and their retry).

Runs on Python 3.7 (numpy 1.x) and later.
"""

import os
import shutil
import tempfile
import time

import numpy

from modelhost.daemons.engine import Engine, operation

MiB = 2**20

# unload() with leak_on_unload parks the weights here, out of the engine's sight.
_forgotten = []


def _touched(mebibytes):
    # np.ones writes every byte, so every page is resident, not just reserved.
    return numpy.ones(int(mebibytes) * MiB, dtype=numpy.uint8)


class MemoryEngineNoOffload(Engine):
    def __init__(self, resident_mib=64, leak_on_unload=False, offload_dir=None, fail_loads=0,
                 **options):
        super(MemoryEngineNoOffload, self).__init__(**options)
        self.resident_mib = int(resident_mib)
        self.leak_on_unload = bool(leak_on_unload)
        self.offload_dir = offload_dir
        self.fail_loads = int(fail_loads)
        self.weights = None
        self.loads = 0
        self.where = "unloaded"  # what the engine itself believes

    def load(self):
        if self.fail_loads > 0:
            self.fail_loads -= 1
            raise RuntimeError("this load fails on purpose")
        self.weights = _touched(self.resident_mib)
        self.loads += 1
        self.where = "resident"

    def unload(self):
        if self.leak_on_unload and self.weights is not None:
            _forgotten.append(self.weights)
        self.weights = None
        self.where = "unloaded"

    def describe(self):
        return {"resident_mib": self.resident_mib, "loads": self.loads}

    @operation
    def work(self, ctx, seconds: float = 0.0, peak_mib: int = 0):
        """Hold `peak_mib` more for `seconds`, checking for cancellation."""
        extra = _touched(peak_mib) if peak_mib else None
        end = time.monotonic() + seconds
        while True:
            ctx.check_cancelled()
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(0.01, left))
        del extra
        return {"pid": os.getpid(), "resident_mib": self.resident_mib, "peak_mib": peak_mib}

    @operation
    def info(self, ctx):
        return {"pid": os.getpid(), "where": self.where, "loads": self.loads,
                "holds_mib": 0 if self.weights is None else self.weights.nbytes // MiB,
                "forgotten_mib": sum(array.nbytes for array in _forgotten) // MiB}


class MemoryEngine(MemoryEngineNoOffload):
    _made_dir = None  # the temporary offload_dir this engine created, removed by unload()

    def _offload_path(self):
        if self.offload_dir is None:
            self.offload_dir = self._made_dir = tempfile.mkdtemp(prefix="mh-offload-")
        return os.path.join(self.offload_dir, "weights-{}.npy".format(os.getpid()))

    def offload(self):
        """Stand-in for "weights to host RAM": to a file, so that the probed memory drops."""
        numpy.save(self._offload_path(), self.weights)
        self.weights = None
        self.where = "offloaded"

    def onload(self):
        path = self._offload_path()
        self.weights = numpy.load(path)
        os.remove(path)
        self.where = "resident"

    def unload(self):
        super(MemoryEngine, self).unload()
        if self.offload_dir is not None and os.path.exists(self._offload_path()):
            os.remove(self._offload_path())  # unloaded while offloaded
        if self._made_dir is not None:
            shutil.rmtree(self._made_dir, ignore_errors=True)
            self.offload_dir = self._made_dir = None
