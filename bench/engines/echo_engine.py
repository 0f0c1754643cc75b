"""Bench-only engine: returns its argument unchanged, so a call measures modelhost's overhead."""

from modelhost.daemons.engine import Engine, operation


class EchoEngine(Engine):
    @operation
    def echo(self, ctx, data=None):
        return data
