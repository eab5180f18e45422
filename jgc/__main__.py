"""`python -m jgc` runs the command line."""

import sys

from jgc._src.cli import main

sys.exit(main())
