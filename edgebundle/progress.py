"""Progress display that works with or without tqdm (a packer-only dependency).

The device side must not need tqdm, so it gets a plain stderr meter when tqdm is absent.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, Protocol


class Bar(Protocol):
    """What progress is reported to: tqdm, the plain meter below, or a test's counter."""

    def update(self, n: int) -> Any: ...


def close_bar(bar: object) -> None:
    """Close ``bar`` if it can be closed (tqdm can; a test's counter need not)."""
    close = getattr(bar, "close", None)
    if callable(close):
        close()


class _Plain:
    def __init__(self, total: Optional[int], desc: str) -> None:
        self.total = total
        self.desc = desc
        self.n = 0
        self._last = 0.0

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            pct = f" {100 * self.n // self.total}%" if self.total else ""
            sys.stderr.write(f"{self.desc}: {self.n / 1e6:.1f} MB{pct}\n")

    def close(self) -> None:
        pass


class _Null:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


NULL_BAR = _Null()


def progress_bar(total: Optional[int], desc: str, enabled: bool = True) -> Any:
    """A bar with ``update(n)`` and ``close()``, counting bytes."""
    if not enabled:
        return _Null()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Plain(total, desc)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                leave=False, file=sys.stderr)
