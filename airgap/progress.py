"""Progress bars for long work: on a terminal only, off with --quiet, plain output otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def byte_progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], object]]:
    """Yield an `advance(n_bytes)` callable backed by a tqdm bar on stderr, or a no-op."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    with tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        yield bar.update
