"""Per-service circuit breaker: a pure state machine, the clock passed in.

    ticket = breaker.admit(now)          # None: reject fast (503, Retry-After: retry_after(now))
    ...send the request...
    breaker.record(ticket, ok, now)      # a verdict: the upstream answered well or failed
    breaker.release(ticket)              # or no verdict: the client went away first

Every admitted request must end in exactly one `record` or `release`.

CLOSED admits everything and counts consecutive failures; `failures` of them open the breaker.
OPEN admits nothing for `open_for` seconds, then the next `admit` turns it HALF_OPEN, which
admits at most `half_open_probes` requests at a time; `successes_to_close` successes close it,
one failure opens it again.

A ticket is the breaker's epoch (a positive int, so always truthy) at admission; every state
change starts a new epoch. Only results from the current epoch count, so a slow request admitted
while CLOSED that fails after the breaker already opened neither re-opens it nor frees a probe
slot it never held.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["BreakerState", "CircuitBreaker", "Ticket"]

Ticket = int


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED, _OPEN, _HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class CircuitBreaker:
    __slots__ = (
        "failures", "open_for", "half_open_probes", "successes_to_close",
        "_state", "_epoch", "_consecutive_failures", "_opened_at", "_probes", "_successes",
    )  # fmt: skip

    def __init__(
        self,
        failures: int = 5,
        open_for: float = 30.0,
        half_open_probes: int = 1,
        successes_to_close: int | None = None,
    ) -> None:
        if successes_to_close is None:
            successes_to_close = half_open_probes
        if failures < 1 or half_open_probes < 1 or successes_to_close < 1 or not open_for >= 0:
            raise ValueError("breaker needs failures, probes and successes >= 1 and open_for >= 0")
        self.failures = failures
        self.open_for = open_for
        self.half_open_probes = half_open_probes
        self.successes_to_close = successes_to_close
        self._state = _CLOSED
        self._epoch: Ticket = 1
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probes = 0  # HALF_OPEN: admitted and not yet recorded or released
        self._successes = 0  # HALF_OPEN: successful probes so far

    def admit(self, now: float) -> Ticket | None:
        """A ticket if a request may go upstream now, else None."""
        state = self._state
        if state is _CLOSED:
            return self._epoch
        if state is _OPEN:
            if now < self._opened_at + self.open_for:
                return None
            self._move(_HALF_OPEN)
        if self._probes >= self.half_open_probes:
            return None
        self._probes += 1
        return self._epoch

    def record(self, ticket: Ticket, ok: bool, now: float) -> None:
        """The verdict on an admitted request; stale tickets (an earlier epoch) are ignored."""
        if ticket != self._epoch:
            return
        if self._state is _CLOSED:
            if ok:
                self._consecutive_failures = 0
            else:
                self._consecutive_failures += 1
                if self._consecutive_failures >= self.failures:
                    self._open(now)
        else:  # HALF_OPEN: OPEN never issues tickets, so a current one is a probe
            self._probes -= 1
            if not ok:
                self._open(now)
            else:
                self._successes += 1
                if self._successes >= self.successes_to_close:
                    self._move(_CLOSED)

    def release(self, ticket: Ticket) -> None:
        """An admitted request ended with no verdict: free its probe slot, count nothing."""
        if ticket == self._epoch and self._state is _HALF_OPEN:
            self._probes -= 1

    def state(self, now: float) -> BreakerState:
        """The state as `admit(now)` would see it (OPEN reads as HALF_OPEN once open_for passed)."""
        if self._state is _OPEN and now >= self._opened_at + self.open_for:
            return _HALF_OPEN
        return self._state

    def retry_after(self, now: float) -> float:
        """Seconds until an OPEN breaker lets a probe through; 0 when not OPEN."""
        if self._state is _OPEN:
            return max(0.0, self._opened_at + self.open_for - now)
        return 0.0

    def snapshot(self, now: float) -> dict[str, Any]:
        """For the admin API."""
        is_open = self._state is _OPEN
        return {
            "state": self.state(now).value,
            "consecutive_failures": self._consecutive_failures,
            "opened_at": self._opened_at if is_open else None,
            "retry_in": self.retry_after(now) if is_open else None,
            "probes_in_flight": self._probes,
        }

    def _open(self, now: float) -> None:
        self._move(_OPEN)
        self._opened_at = now

    def _move(self, state: BreakerState) -> None:
        self._state = state
        self._epoch += 1
        self._consecutive_failures = 0
        self._probes = 0
        self._successes = 0
