"""``python -m assayer.watch --directory D --evaluator REF ...``: the original command line (:mod:`assayer.compat`)."""

import sys

from .compat import watch_main as main

if __name__ == "__main__":
    sys.exit(main())
