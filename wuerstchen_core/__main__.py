"""`python -m wuerstchen_core generate | convert | run`."""

import sys

from .cli import main

sys.exit(main())
