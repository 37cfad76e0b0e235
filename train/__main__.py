"""``python -m train`` (used by ``accelerate launch -m train comm ...``)."""

import sys

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
