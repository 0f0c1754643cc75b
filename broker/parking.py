"""Replies the broker holds until their way onward opens, bounded in bytes and age.

Two kinds of reply cannot be sent on the moment they arrive, and dropping
either loses finished work:
- a reply for a client that is not connected (yet): after a broker restart,
  daemons resend the replies of calls that ended while it was down, often
  before their clients have reconnected. A ROUTER would drop them silently;
  they are held until the client next speaks (it pings every second while it
  waits), for at most `client_liveness_s`;
- a reply from a daemon slot the broker does not know yet: after a restart,
  slots flush their queued replies before the daemon's control socket has
  registered again. Replies are accepted only from registered slots, so they
  are held until the registration names the slot, for about a liveness;
- a reply for a call the broker does not know (it ended while the broker was
  down, or the daemon sent it again): held until the client's next ping,
  which lists the ids it still waits for, so no reply reaches it twice.

Pure bookkeeping: no sockets, time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class Held:
    since: float
    frames: list
    size: int
    tag: object = None  # what the holder needs to decide on it later (a request id)


@dataclass
class Parking:
    max_bytes: int
    # key -> replies in arrival order; the dict itself is ordered by first arrival.
    lots: OrderedDict = field(default_factory=OrderedDict)
    size: int = 0

    def hold(self, key, frames: list, now: float, tag=None) -> bool:
        """Keep `frames` for `key`; False when they do not fit the byte budget."""
        size = sum(len(frame) for frame in frames)
        if self.size + size > self.max_bytes:
            return False
        self.lots.setdefault(key, deque()).append(Held(now, frames, size, tag))
        self.size += size
        return True

    def take(self, key) -> list[Held]:
        """Everything held for `key`, oldest first, and forget it."""
        lot = self.lots.pop(key, None)
        if not lot:
            return []
        self.size -= sum(held.size for held in lot)
        return list(lot)

    def release(self, key) -> list[list]:
        """The frames of every message held for `key`, oldest first, and forget them."""
        return [held.frames for held in self.take(key)]

    def expire(self, now: float, max_age_s: float) -> list[tuple]:
        """(key, frames) of every message held longer than `max_age_s`, forgotten."""
        expired = []
        for key in list(self.lots):
            lot = self.lots[key]
            while lot and now - lot[0].since > max_age_s:
                held = lot.popleft()
                self.size -= held.size
                expired.append((key, held.frames))
            if not lot:
                del self.lots[key]
        return expired

    def __contains__(self, key) -> bool:
        return key in self.lots

    def oldest(self) -> float | None:
        return min((lot[0].since for lot in self.lots.values()), default=None)
