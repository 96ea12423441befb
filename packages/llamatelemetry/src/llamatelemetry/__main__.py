"""``python -m llamatelemetry``: the same command line as ``llamatelemetry``."""

import sys

from llamatelemetry.cli import main

sys.exit(main())
