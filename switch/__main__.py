"""``python -m switch``: see :mod:`switch.cli`."""

import sys

from switch.cli import main

if __name__ == "__main__":
    sys.exit(main())
