"""TangoFluxEngine with stand-ins for upstream's model and VAE, for tests through `modelhost up`.

Only `_build_model()` is replaced (see tests/standins/tangoflux.py): the
daemon runs the engine's own argument checks, seeds, progress, cancellation,
cutting and tiers, with no weights and no sound.
"""

import os
import sys

# tests/ holds the stand-ins; the daemon's pythonpath names only tests/engines.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from modelhost.daemons.tangoflux.engine import TangoFluxEngine  # noqa: E402
from standins.tangoflux import build_standins  # noqa: E402


class TangoFluxStandInEngine(TangoFluxEngine):
    def _build_model(self):
        return build_standins(self.model_dir, self.text_encoder_dir, self.device)
