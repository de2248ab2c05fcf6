"""One exception type for every user-facing failure.

The CLI turns a `RosetoolError` into a single line on stderr and exit code 2, so each message must
stand on its own: name the file and the tensor (or field) and say what is wrong.
"""


class RosetoolError(Exception):
    """A mistake in the input (spec, checkpoint, flags) rather than a bug in rosetool."""


class SpecError(RosetoolError):
    """A mapping spec that does not validate."""


class CheckpointError(RosetoolError):
    """A checkpoint that is missing, truncated, inconsistent or unsafe."""


class RosetoolWarning(UserWarning):
    """Something suspicious but convertible (non-finite weights); `--strict` turns it into an error."""
