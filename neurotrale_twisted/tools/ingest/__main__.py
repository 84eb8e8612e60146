"""``python -m neurotrale_twisted.tools.ingest``: the same as ``neurotrale-ingest``."""

import sys

from neurotrale_twisted.tools.ingest.cli import main

if __name__ == "__main__":
    sys.exit(main())
