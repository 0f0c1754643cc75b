"""Bench-only engine: returns its argument unchanged, so a call measures modelhost's overhead."""

from modelhost.daemons.engine import Engine, operation


class EchoEngine(Engine):
    @operation
    def echo(self, ctx, data=None):
        return data

    @operation
    def chunks(self, ctx, n=10, size=0):
        """n chunks of `size` bytes, streamed: bench/cluster.py's streaming row."""
        for index in range(n):
            yield bytes([index % 256]) * size
        return n
