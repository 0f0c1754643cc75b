"""TalkingGaussianEngine with stand-ins for upstream: for the tests, never for serving.

Only the two seams are replaced: `_build_model()` returns stand-ins with
upstream's interfaces (tests/standins/talkinggaussian.py) instead of loading the
checkpoint, HuBERT and the CUDA rasterizer, and `_stage_command()` runs that
file's stand-in scripts instead of upstream's. The preflight checks of the
CUDA extensions and of packages this machine does not have are left out; the
checkout, dataset, model and HuBERT directory checks run as they are.
"""

import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from standins import talkinggaussian as standins  # noqa: E402

from modelhost.daemons.talkinggaussian.engine import TalkingGaussianEngine  # noqa: E402


class StandinTalkingGaussianEngine(TalkingGaussianEngine):
    EXTENSIONS = ()
    RUNTIME_PACKAGES = (("numpy", "numpy"), ("soundfile", "soundfile"), ("PIL", "pillow"))
    EXTRACTOR_PACKAGES = {}
    TRAINING_PACKAGES = ()

    def _build_model(self):
        return standins.build_model(self)

    def _stage_command(self, script, arguments):
        return [sys.executable, standins.HERE, script] + list(arguments)
