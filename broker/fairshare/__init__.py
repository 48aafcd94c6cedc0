"""Fair-share queueing at the broker (issue 4 item 3).

`policy`: pure — each user's decayed recent GPU-seconds (a half-life, as in Slurm fair share)
and the order in which waiting jobs get slots. `scheduler`: the asyncio side — per-model
queues, slots on sites with spare capacity, grants to the highest-priority job, positions for
the QUEUED status. The job service (`broker.service`) awaits a grant before each dispatch.
"""

from broker.fairshare.policy import (
    ORDERS,
    DecayedUsage,
    Waiting,
    arrival_order,
    decayed,
    priority_order,
)
from broker.fairshare.scheduler import (
    FairShareScheduler,
    Grant,
    Position,
    Ticket,
    follow_positions,
)

__all__ = [
    "ORDERS",
    "DecayedUsage",
    "FairShareScheduler",
    "Grant",
    "Position",
    "Ticket",
    "Waiting",
    "arrival_order",
    "decayed",
    "follow_positions",
    "priority_order",
]
