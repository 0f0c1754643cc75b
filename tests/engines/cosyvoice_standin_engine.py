"""CosyVoiceEngine with a stand-in for upstream's CosyVoice2, for tests and `modelhost up`.

Only `_build_model()` is replaced (see tests/standins/cosyvoice.py): the
daemon runs the engine's own argument checks, prompt decoding, voices,
streaming, hop-length reset, warm-up and tiers, with no weights and no speech.
"""

import os
import sys
import weakref

# tests/ holds the stand-ins; the daemon's pythonpath names only tests/engines.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from modelhost.daemons.cosyvoice.engine import CosyVoiceEngine  # noqa: E402
from standins.cosyvoice import CosyVoice2StandIn  # noqa: E402


class CosyVoiceStandInEngine(CosyVoiceEngine):
    def __init__(self, **options):
        super(CosyVoiceStandInEngine, self).__init__(**options)
        # Every stand-in built, oldest first, as weak references: unload() must
        # be able to drop the last one.
        self.built = []

    def _build_model(self):
        model = CosyVoice2StandIn(self.model_dir, load_jit=self.load_jit, load_trt=self.load_trt,
                                  load_vllm=self.load_vllm, fp16=self.fp16,
                                  trt_concurrent=self.trt_concurrent)
        self.built.append(weakref.ref(model))
        return model

    @property
    def standin(self):
        """The stand-in built last (None once it has been dropped)."""
        return self.built[-1]() if self.built else None
