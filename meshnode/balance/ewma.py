"""Peak EWMA: a latency estimate that is pessimistic on the way up and forgiving on the way down.

After linkerd2-proxy's `linkerd/ewma` (tower's `PeakEwma`): an observation above the current
estimate replaces it at once (the peak), one below it is blended in with an exponential moving
average whose weight depends on the time since the last update, and the estimate decays
towards zero while nothing is observed, so an endpoint that was slow once is tried again later
instead of starving forever.

Owns the estimator only; the clock is passed in (`now`), so it is pure. Imports nothing of
meshnode's.
"""

from __future__ import annotations

import math

__all__ = ["DECAY", "DEFAULT_RTT", "FAILURE_RTT", "PeakEwma"]

# The time constant of the decay, in seconds. linkerd's default: long enough that a latency
# spike keeps an endpoint disfavoured for a few seconds (e^-1 of the peak left after 10 s),
# short enough that a recovered endpoint wins traffic back within a minute or so.
DECAY = 10.0

# The estimate of an endpoint nothing is known about, when there is no peer to compare with
# (seconds). linkerd uses 30 ms for request latency; ours measures TCP connect latency, which
# on a LAN is well under a millisecond, so 1 ms is "plausible but not flattering". `Loads`
# seeds a new endpoint with its peers' mean estimate instead, when it has peers: a new endpoint
# then competes as a typical one, neither flooded (estimate 0) nor starved (estimate far above
# everyone's).
DEFAULT_RTT = 0.001

# What a failed attempt counts as (seconds). A refused connect returns in microseconds and
# would otherwise make a dead endpoint look like the fastest one (the "black hole" problem).
# 100 ms is far above any healthy connect on a LAN, so the endpoint loses P2C comparisons
# until the estimate decays (about DECAY * ln(100 ms / healthy rtt), tens of seconds);
# persistent failure is outlier ejection's job, not this.
FAILURE_RTT = 0.1


class PeakEwma:
    """One endpoint's latency estimate in seconds."""

    __slots__ = ("_decay", "_estimate", "_stamp")

    def __init__(self, now: float, initial: float = DEFAULT_RTT, decay: float = DECAY) -> None:
        self._estimate = initial
        self._stamp = now
        self._decay = decay

    def observe(self, rtt: float, now: float) -> None:
        """Fold in one observation made at `now`."""
        est = self._estimate
        if rtt > est:
            self._estimate = rtt  # the peak: believe bad news at once
        else:
            elapsed = now - self._stamp
            # The longer since the last update, the more the new sample weighs: a sample right
            # after another barely moves the estimate, one after a long quiet replaces it.
            w = math.exp(-elapsed / self._decay) if elapsed > 0 else 1.0
            self._estimate = est * w + rtt * (1.0 - w)
        self._stamp = now

    def cost(self, now: float) -> float:
        """The estimate at `now`: decayed towards zero since the last update, as tower does
        (an observation of 0), so that an idle endpoint's old peak fades."""
        self.observe(0.0, now)
        return self._estimate

    def peek(self, now: float) -> float:
        """The estimate at `now` without recording a read (reports): same value as `cost`."""
        elapsed = now - self._stamp
        return self._estimate * math.exp(-elapsed / self._decay) if elapsed > 0 else self._estimate
