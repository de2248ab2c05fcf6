"""torch.distributed.checkpoint's errors, unwrapped.

DCP wraps whatever failed while loading or saving (a missing chunk, a corrupt record, rosetool's own
error from a tensor it was producing, a full disk) in a `CheckpointException`, which derives from
`BaseException`: `except Exception` misses it, and its text is a multi-line traceback. Callers catch it
here and get the first failure back, to report as one line or re-raise as what it was.
"""

from __future__ import annotations

from torch.distributed.checkpoint.api import CheckpointException

__all__ = ["CheckpointException", "first_failure", "reason"]


def first_failure(exc: BaseException) -> BaseException:
    """The exception DCP wrapped (the first rank's), or `exc` itself when it wraps none."""
    if isinstance(exc, CheckpointException):
        for inner, _ in exc.failures.values():
            return first_failure(inner)
    return exc


def reason(exc: BaseException) -> str:
    """`Type: message` of the first failure, on one line, at most 200 characters."""
    inner = first_failure(exc)
    text = " ".join(str(inner).split())
    return f"{type(inner).__name__}: {text}"[:200] if text else type(inner).__name__
