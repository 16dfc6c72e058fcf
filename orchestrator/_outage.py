"""A periodic pass that Redis can interrupt: say so once when the outage begins and once
when it ends, not on every pass in between (a sweep runs every second)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ._stores import StoreUnavailable


class OutageLog:
    def __init__(self, what: str, log: logging.Logger) -> None:
        self.what = what
        self.log = log
        self.failures = 0

    def run(self, one_pass: Callable[[], int]) -> int:
        """`one_pass()`, or 0 while the store is unreachable."""
        try:
            result = one_pass()
        except StoreUnavailable as exc:
            self.failures += 1
            if self.failures == 1:
                self.log.warning("%s paused: %s", self.what, exc)
            return 0
        if self.failures:
            self.log.warning("%s resumed after %d failed pass(es)", self.what, self.failures)
            self.failures = 0
        return result
