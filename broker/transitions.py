"""Daemon states as the scheduler keeps them: the one function that changes a daemon's
state, the table of the changes it allows, and the tier-to-state tables.

Every change names its cause, and a cause may only make the changes the table
below allows (broker/DESIGN.md has it too); anything else raises
IllegalTransition, an InternalError, which the broker's handler logs with the
message it was handling:

    cause        from                        to
    REPORT       any                         an engine's state (not starting, crashed, stopped)
    LOST         any                         crashed
    STOPPED      any                         stopped
    SUPERVISOR   any                         failed, stopped, crashed
                 stopped, failed, crashed    starting
    START        stopped, failed, crashed    starting

Staying in the same state is always allowed.
"""

from __future__ import annotations

import enum

from modelhost.errors import InternalError
# The tier-to-state tables are the wire's (the daemon runtime reads them too).
from modelhost.protocol import MOVING_STATE, STATE_OF_TIER, DaemonState

__all__ = ["TRANSITIONAL", "STATE_OF_TIER", "MOVING_STATE", "Cause", "IllegalTransition",
           "check", "transition"]

# Daemon states while an engine moves between tiers: the states a move passes through.
TRANSITIONAL = frozenset(MOVING_STATE.values())


class Cause(enum.Enum):
    """Why a daemon's state changes."""

    REPORT = "its own report"  # register or state: what its engine is doing
    LOST = "the loss of its process"  # it exited or fell silent, unasked
    STOPPED = "the stop ordered to free memory"  # ... took effect
    SUPERVISOR = "its supervisor's report"  # on a process that is not registered
    START = "the start of a process stopped to free memory"


ANY = frozenset(DaemonState.ALL)
NO_PROCESS = frozenset((DaemonState.STOPPED, DaemonState.FAILED, DaemonState.CRASHED))
# What a daemon says of its engine; starting, crashed and stopped are what the
# broker knows of its process.
ENGINE_STATES = ANY - {DaemonState.STARTING, DaemonState.CRASHED, DaemonState.STOPPED}

# cause -> the (from states, to states) pairs it may change a daemon's state along.
LEGAL = {
    Cause.REPORT: ((ANY, ENGINE_STATES),),
    Cause.LOST: ((ANY, frozenset((DaemonState.CRASHED,))),),
    Cause.STOPPED: ((ANY, frozenset((DaemonState.STOPPED,))),),
    Cause.SUPERVISOR: ((ANY, frozenset((DaemonState.FAILED, DaemonState.STOPPED,
                                        DaemonState.CRASHED))),
                       (NO_PROCESS, frozenset((DaemonState.STARTING,)))),
    Cause.START: ((NO_PROCESS, frozenset((DaemonState.STARTING,))),),
}


class IllegalTransition(InternalError):
    """A state change that the table does not allow for its cause."""


def check(daemon, state: str, cause: Cause) -> None:
    """Raise IllegalTransition unless `cause` may change the daemon's state to `state`."""
    if state == daemon.state:
        return
    if not any(daemon.state in froms and state in tos for froms, tos in LEGAL[cause]):
        raise IllegalTransition("daemon {}: {} cannot change its state from {} to {} (see "
                                "broker/transitions.py)".format(daemon.name, cause.value,
                                                                daemon.state, state))


def transition(daemon, state: str, cause: Cause) -> None:
    """The one way a daemon's state changes."""
    check(daemon, state, cause)
    daemon.state = state
