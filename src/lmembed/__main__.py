"""`python -m lmembed` (and `torchrun -m lmembed ...`)."""

import sys

from .cli import main

sys.exit(main())
