"""Progress bars for large transfers (tqdm on stderr): a 900 MiB put should not look like a hang.

A transfer is one ZeroMQ message, so the bar shows it start and end (with the rate), not each byte.
Off with ``progress=False`` on a call, or ``PLANWIRE_PROGRESS=0`` for the process. When stderr is not a
terminal the bar is plain ASCII, printed once at the start and once at the end (no redraws in logs).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

PROGRESS_ENV = "PLANWIRE_PROGRESS"
MIN_BYTES = 64 << 20  # transfers larger than this show a bar


def enabled(flag: bool | None = None) -> bool:
    """``flag`` when given, else the environment: on unless ``PLANWIRE_PROGRESS`` is 0/false/no/off. The one
    rule for every progress display (transfers here, builds in the exporter)."""
    if flag is not None:
        return flag
    return os.environ.get(PROGRESS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def wanted(nbytes: int, progress: bool | None) -> bool:
    """Whether a transfer of ``nbytes`` shows a bar: over MIN_BYTES, unless turned off (see :func:`enabled`)."""
    return enabled(progress) and nbytes > MIN_BYTES


@contextlib.contextmanager
def transfer(desc: str, nbytes: int, progress: bool | None = None) -> Iterator[None]:
    """A bar for a transfer of ``nbytes`` described as ``desc``, complete when the block ends normally."""
    if not wanted(nbytes, progress):
        yield
        return
    from tqdm import tqdm  # only for large transfers: keeps it off the import path of every client

    tty = sys.stderr.isatty()
    bar = tqdm(
        total=nbytes,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        ascii=not tty,
        dynamic_ncols=tty,
        ncols=None if tty else 100,
        mininterval=0.2 if tty else 3600,
        leave=True,
    )
    try:
        if not tty:
            sys.stderr.write("\n")  # ends tqdm's first line: a log line saying the transfer started
        yield
        bar.update(nbytes)
    finally:
        bar.close()
