"""Daemon states as the scheduler keeps them: which states are moves between tiers,
and the state a daemon settles in at each tier.
"""

from __future__ import annotations

from modelhost.protocol import DaemonState, Tier

# Daemon states while an engine moves between tiers.
TRANSITIONAL = frozenset((DaemonState.LOADING, DaemonState.OFFLOADING,
                          DaemonState.ONLOADING, DaemonState.UNLOADING))
# The state a daemon settles in at each tier. The daemon runtime has the same table;
# its one home is due in modelhost.protocol, and this then becomes an import of it.
STATE_OF_TIER = {Tier.RESIDENT: DaemonState.READY, Tier.OFFLOADED: DaemonState.OFFLOADED,
                 Tier.UNLOADED: DaemonState.UNLOADED, Tier.STOPPED: DaemonState.STOPPED}
# What `ps` shows for a move that is ordered but not begun: (from tier, to tier) -> state.
MOVING_STATE = {(Tier.UNLOADED, Tier.RESIDENT): DaemonState.LOADING,
                (Tier.OFFLOADED, Tier.RESIDENT): DaemonState.ONLOADING,
                (Tier.RESIDENT, Tier.OFFLOADED): DaemonState.OFFLOADING,
                (Tier.RESIDENT, Tier.UNLOADED): DaemonState.UNLOADING,
                (Tier.OFFLOADED, Tier.UNLOADED): DaemonState.UNLOADING}
