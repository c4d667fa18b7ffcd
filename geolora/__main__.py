"""``python -m geolora``: the ``geolora`` command line (same as the console script)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
