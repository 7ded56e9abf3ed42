"""``python -m gradad``: the same command line as the ``gradad`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
