"""`python -m jgc` runs the command line."""

import sys

from jgc._src.surfaces.cli import main

sys.exit(main())
