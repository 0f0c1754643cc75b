"""`python -m modelhost ...`: the same as the `modelhost` command."""

import sys

from .cli import main

sys.exit(main())
