"""How a server process ends."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """End a server process without the interpreter's teardown. Native thread pools
    (torch, onnxruntime, tokenizers) still running then can abort it ("terminate called
    without an active exception", exit -6) after a clean drain; everything worth keeping
    (logs, metrics files, the run folder) is flushed or removed by now."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
