"""Skip interpreter teardown once a conversion's output is on disk.

Tearing down an interpreter that imported torch (module finalisers, freeing every object one by
one) costs 0.6-1 s, more than a small conversion. When the output folder is closed and renamed into
place and the report printed, nothing is left to run: flush the standard streams and leave with
`os._exit`. Only the real `rosetool` process does this; in-process callers (tests, the Python API)
get their normal return.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def is_console_process() -> bool:
    return Path(sys.argv[0]).name == "rosetool"


def exit_now_if_console() -> None:
    """Call only when every file the command wrote is closed and its summary is printed."""
    if not is_console_process():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
