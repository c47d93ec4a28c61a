"""`python -m lab.sim`: the replay simulator (lab/sim/cli.py)."""

import sys

from lab.sim.cli import main

sys.exit(main())
