"""``python -m experiments SUITE [options]``."""
import sys

from experiments.cli import main

sys.exit(main())
