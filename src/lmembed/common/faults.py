"""Deterministic faults for the tests of crash safety.

A test sets LMEMBED_FAULT=<point> (in a subprocess, or in-process with monkeypatch) and the code
misbehaves exactly there, instead of at whatever moment a timer or a real full disk happens to
hit. Two kinds of points:

- kills (``fault_point``): the process ends at once with os._exit (no cleanup handlers, no
  finally blocks: what a kill -9 leaves). save:staged (the new folder written, not yet switched
  in), save:switched (switched in, the user's files not yet moved back), train:epoch (a
  checkpoint written), bench:row (a bench row written). ``POINT=term`` sends the process a
  SIGTERM there instead, which it may handle (lmembed.common.files.terminate_as_interrupt).
- errors (``fault_raise``): the given exception is raised where a real one would come from.
  save:disk-full (safetensors' own error for a full disk, while writing a save's tensors).
"""

from __future__ import annotations

import os
import signal

FAULT_EXIT = 137  # what a shell reports for kill -9


def active(name: str) -> bool:
    return os.environ.get("LMEMBED_FAULT") == name


def fault_point(name: str) -> None:
    if active(name):
        os._exit(FAULT_EXIT)
    if active(f"{name}=term"):
        os.kill(os.getpid(), signal.SIGTERM)


def fault_raise(name: str, error: BaseException) -> None:
    """Raise `error` here when the fault `name` is set."""
    if active(name):
        raise error
