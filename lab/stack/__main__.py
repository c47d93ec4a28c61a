"""`python -m lab.stack`: the local stack (lab/stack/cli.py)."""

import sys

from lab.stack.cli import main

sys.exit(main())
