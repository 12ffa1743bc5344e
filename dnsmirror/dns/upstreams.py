"""What the forwarder remembers about each upstream resolver: is it answering, and how fast.

Pure logic, no sockets (the clock is passed in). Like unbound's infra cache, each upstream keeps a
smoothed round-trip time; a timeout or a refusal marks it down, and a down upstream is skipped for
client queries until a background probe finds it answering again (probes back off while it stays
down). Queries go to the upstreams that are up, fastest first; the down ones are tried only after
every working one failed, so a query is never denied an upstream that might answer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

# first probe of a down upstream after this; doubled per failed probe up to the maximum
PROBE_BACKOFF_START = 0.5
PROBE_BACKOFF_MAX = 8.0
# one query in this many tries a slower working upstream first, so its latency stays measured
EXPLORE_ONE_IN = 50
_SMOOTHING = 0.25


@dataclass
class UpstreamState:
    """Health and latency of one upstream."""

    up: bool = True
    srtt: float = 0.0  # smoothed round-trip time, seconds; 0 until measured
    measured: bool = False
    failures: int = 0  # consecutive failures (timeouts, refusals, failed probes)
    next_probe: float = 0.0  # when a down upstream is probed next
    backoff: float = PROBE_BACKOFF_START
    last_error: str = ""


class UpstreamTable:
    """Health and latency of ``count`` upstreams, indexed as in ``dns.upstreams``."""

    def __init__(self, count: int, rng: random.Random | None = None) -> None:
        self.states = [UpstreamState() for _ in range(count)]
        self._rng = rng or random.Random()
        self._queries = 0

    def order(self) -> list[int]:
        """Upstreams to try for one query, in order: the working ones, fastest first (unmeasured ones
        after the measured, in config order), then the down ones as a last resort, in config order."""
        if len(self.states) == 1:
            return [0]
        working = [i for i, state in enumerate(self.states) if state.up]
        down = [i for i, state in enumerate(self.states) if not state.up]
        working.sort(key=lambda i: (not self.states[i].measured, self.states[i].srtt))
        self._queries += 1
        if len(working) > 1 and self._queries % EXPLORE_ONE_IN == 0:
            working.insert(0, working.pop(self._rng.randrange(1, len(working))))
        return working + down

    def answered(self, index: int, rtt: float) -> bool:
        """An answer came back after ``rtt`` seconds; True when this brought the upstream back up."""
        state = self.states[index]
        if state.measured:
            state.srtt += _SMOOTHING * (rtt - state.srtt)
        else:
            state.srtt, state.measured = rtt, True
        return self.recovered(index)

    def recovered(self, index: int) -> bool:
        """The upstream answers again (here, or as another DNS process found); True when this brought it
        back up. Its latency is left as measured here."""
        state = self.states[index]
        recovered = not state.up
        state.up, state.failures, state.backoff, state.last_error = True, 0, PROBE_BACKOFF_START, ""
        return recovered

    def failed(self, index: int, now: float, reason: str, probe: bool = False) -> bool:
        """A query (or a ``probe``) timed out or was refused; the upstream is down until a probe says
        otherwise.

        True when this took it down. Only a failed probe backs the next probe off: the queries that were
        under way when an upstream died fail too, and must not push its recovery further away.
        """
        state = self.states[index]
        state.failures += 1
        state.last_error = reason
        if state.up:
            state.up = False
            state.backoff = PROBE_BACKOFF_START
            state.next_probe = now + state.backoff
            return True
        if probe:
            state.backoff = min(state.backoff * 2, PROBE_BACKOFF_MAX)
            state.next_probe = now + state.backoff
        return False

    def due_probes(self, now: float) -> list[int]:
        """Down upstreams whose next probe is due; each is scheduled again as if the probe failed."""
        due = []
        for index, state in enumerate(self.states):
            if not state.up and state.next_probe <= now:
                due.append(index)
                # a probe that is never answered counts as failed when it times out; until then no second one
                state.next_probe = float("inf")
        return due

    def down(self) -> list[int]:
        """Indexes of the upstreams that are down now."""
        return [i for i, state in enumerate(self.states) if not state.up]


def describe(upstreams: Sequence[object], table: UpstreamTable) -> list[str]:
    """One line per upstream for logs: address, up or down, latency."""
    return [
        f"{upstream} {'up' if s.up else 'down'} srtt={s.srtt * 1000:.1f}ms"
        for upstream, s in zip(upstreams, table.states, strict=True)
    ]
