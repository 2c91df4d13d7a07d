"""``python -m hyperbit``: the ``hyperbit`` command."""

import sys

from .cli import main

sys.exit(main())
