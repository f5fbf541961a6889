"""Allow ``python -m gbalance``."""
import sys

from gbalance.cli import main

sys.exit(main())
