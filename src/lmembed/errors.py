"""One exception type for every problem a user can fix.

The CLI prints ``LmembedError`` as a single ``error: ...`` line (no traceback), so every message
names the file, field or flag at fault and what was expected instead.
"""


class LmembedError(Exception):
    """A user-facing error: bad input, bad config, missing or corrupt files."""


class TrainingDiverged(LmembedError):
    """The loss became NaN/inf; the last good checkpoint is kept."""
