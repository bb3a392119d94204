"""Deterministic kills for the tests of crash safety.

A test sets LMEMBED_FAULT=<point> in a subprocess; when the code passes that point the process
ends at once with os._exit (no cleanup handlers, no finally blocks: what a kill -9 leaves), so
"the old result or the new one is complete" can be checked at exactly the worst moments instead
of at whatever moment a timer happens to hit. Points: save:staged (the new folder written, not
yet switched in), save:switched (switched in, the user's files not yet moved back), train:epoch
(a checkpoint written), bench:row (a bench row written).
"""

from __future__ import annotations

import os

FAULT_EXIT = 137  # what a shell reports for kill -9


def fault_point(name: str) -> None:
    if os.environ.get("LMEMBED_FAULT") == name:
        os._exit(FAULT_EXIT)
