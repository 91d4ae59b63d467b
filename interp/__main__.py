"""``python -m interp``: the same command line as ``interp``."""

import sys

from interp.cli import main

sys.exit(main())
