"""Progress of long loops (training steps, voxel chunks, dictionary blocks): never silent for long.

On a terminal a ``tqdm`` bar is drawn on stderr; elsewhere (log files, CI, cluster jobs, Nipype
workers whose stderr is a pipe) a bar's carriage returns are noise, so one log line is written
at most every :data:`LOG_EVERY_S` seconds instead, and one at the end. Either way a step longer
than ~10 s shows that it is alive and how far it got.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

LOG_EVERY_S = 10.0
log = logging.getLogger("qmri_bids.progress")


def _use_bar() -> bool:
    if os.environ.get("QMRI_BIDS_PROGRESS", "").lower() in ("0", "off", "log"):
        return False
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             unit: str = "it", min_total: int = 2) -> Iterator[T]:
    """Iterate ``iterable`` reporting progress (see the module docstring). Loops of fewer than
    ``min_total`` items are not reported."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if total is not None and total < min_total:
        yield from iterable
        return
    if _use_bar():
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, leave=False,
                        mininterval=1.0, file=sys.stderr)
        return
    start = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            of = f"/{total}" if total else ""
            eta = ""
            if total:
                eta = f", about {(now - start) / done * (total - done):.0f} s left"
            log.info("%s: %d%s %s (%.0f s%s)", desc, done, of, unit, now - start, eta)
    if time.monotonic() - start >= LOG_EVERY_S:
        log.info("%s: %d %s done in %.0f s", desc, done, unit, time.monotonic() - start)
