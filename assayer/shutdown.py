"""``python -m assayer.shutdown``: the original command line (:mod:`assayer.compat`)."""

import sys

from .compat import shutdown_main as main

if __name__ == "__main__":
    sys.exit(main())
