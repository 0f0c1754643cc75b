"""Choosing which idle daemons to move down the memory tiers to make room.

Pure functions over plain figures, so the policy is tested on its own:

- milder tiers first: every victim is offloaded before any is unloaded, and
  every victim is unloaded before any process is stopped, because what is
  thrown away must be brought back later, and an onload is cheaper than a
  load, which is cheaper than a process start plus a load;
- within a tier, victims in order of least importance: lowest priority class
  served recently, then no queued work, then least recently used, then
  largest (fewer moves);
- then every move not needed to cover the deficit is dropped again, last
  chosen first, so just enough is freed.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelhost.protocol import Tier

DEPTH = {tier: depth for depth, tier in enumerate(Tier.ALL)}


@dataclass(frozen=True)
class Candidate:
    name: str
    tier: str  # where it is now
    # Bytes it would hold at each tier it can be moved to (its current tier
    # included: what it holds now, measured or accounted, whichever is larger).
    holds: dict
    rank: int  # index in Priority.ALL of the most urgent class it served lately
    last_used: float
    has_queued: bool = False

    def frees(self, target: str) -> int:
        return self.holds[self.tier] - self.holds[target]


@dataclass(frozen=True)
class Step:
    name: str
    target: str
    frees: int


def victim_order(candidates: list[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=lambda c: (-c.rank, c.has_queued, c.last_used,
                                             -c.holds[c.tier]))


def plan_room(deficit: int, candidates: list[Candidate]) -> list[Step] | None:
    """The moves that free at least `deficit` bytes, or None when they cannot."""
    if deficit <= 0:
        return []
    order = victim_order(candidates)
    chosen = {c.name: c.tier for c in order}
    freed = 0
    for target in Tier.ALL[1:]:
        for candidate in order:
            if freed >= deficit:
                break
            current = chosen[candidate.name]
            if target not in candidate.holds or DEPTH[target] <= DEPTH[current]:
                continue
            gain = candidate.holds[current] - candidate.holds[target]
            if gain <= 0:
                continue  # this tier frees nothing for it (measured): try the next
            freed += gain
            chosen[candidate.name] = target
    if freed < deficit:
        return None
    # Undo what is not needed, least important choice last undone.
    for candidate in reversed(order):
        while chosen[candidate.name] != candidate.tier:
            milder = _milder(candidate, chosen[candidate.name])
            loss = candidate.holds[milder] - candidate.holds[chosen[candidate.name]]
            if freed - loss < deficit:
                break
            freed -= loss
            chosen[candidate.name] = milder
    return [Step(c.name, chosen[c.name], c.frees(chosen[c.name]))
            for c in order if chosen[c.name] != c.tier]


def _milder(candidate: Candidate, tier: str) -> str:
    """The next tier up from `tier` that the candidate can be at."""
    for depth in range(DEPTH[tier] - 1, DEPTH[candidate.tier] - 1, -1):
        milder = Tier.ALL[depth]
        if milder in candidate.holds:
            return milder
    return candidate.tier
