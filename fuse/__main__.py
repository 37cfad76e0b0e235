"""``python -m fuse`` (used by ``accelerate launch -m fuse eval ...``)."""

import sys

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
