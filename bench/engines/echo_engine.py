"""Bench-only engine: returns its argument unchanged, so a call measures modelhost's overhead."""

import time

from modelhost.daemons.engine import Engine, operation


class EchoEngine(Engine):
    @operation
    def echo(self, ctx, data=None):
        return data

    @operation
    def sleep(self, ctx, seconds: float = 1.0):
        """A call that runs `seconds` and moves nothing: bench/overhead.py sets the broker's
        CPU for one as long as an array call against that call's."""
        time.sleep(seconds)
        return seconds

    @operation
    def chunks(self, ctx, n=10, size=0):
        """n chunks of `size` bytes, streamed: bench/cluster.py's streaming row."""
        for index in range(n):
            yield bytes([index % 256]) * size
        return n
