"""Row affinity for the engine service: all requests of a row go to one replica.

The first-pass request of a row and its critique requests share the instruction prefix; on the
same replica, vLLM's prefix cache serves the shared part. Each request names a routing key
(its rows' group, ``stages.common.route_key``); replicas are ranked for it by rendezvous
hashing (highest ``hash(key, replica)`` first), which is stable while the replica set is stable and moves only the keys of a replica
that comes or goes. A preferred replica that is full falls back to the others, least loaded
first, so affinity never blocks progress.

Keys hash unevenly over the replicas (a run's groups of rows over 8 replicas put twice the
mean on the busiest one), and affinity alone leaves replicas idle while others hold a queue:
each router counts the prompts it has in flight per replica, and sends a row elsewhere when its
home holds more than one replica's batch of sequences (``slack``: the engine's
``max_num_seqs``) beyond the least loaded replica (``spill_to``). Queued work cannot move
between replicas once it is sent, so the end of a run drains evenly only if the queues stay
short and within a batch of each other; measured at 8 simulated replicas with a slack of 64
prompts, the replicas were busy 82% of the run, two of them queued 100 to 300 prompts at its
end while the others stood idle. The stage actors keep the queues short: they hold requests
beyond a few batches per replica (``clients.InFlightWindow``, which reads the replica count
this router records). A row's prompts travel in one call (split into requests of at most one
replica's batch); with queues held short, a key's requests often spill (at 8 replicas 56% of
the prompts ran off their key's busiest replica), and the replicas prefilled 7% more prompt
tokens than one replica does.
"""

from __future__ import annotations

import hashlib
from typing import List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from . import clients
from .clients import ROUTE

#: Prompts a key's home may hold beyond the least loaded replica before a request goes there,
#: when the deployment does not name its own (``initialize_state``): the pinned vLLM's default
#: ``max_num_seqs`` for an engine made as the replicas make theirs.
DEFAULT_SLACK = 128


def rendezvous_order(key: str, replica_ids: list[str]) -> list[str]:
    """Replica ids ordered by their rendezvous hash with ``key`` (the first is the key's home)."""
    def score(replica_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")

    return sorted(replica_ids, key=score, reverse=True)


def request_route(pending_request: Optional[PendingRequest]) -> str | None:
    """The routing key a request carries, if any."""
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return str(first.get(ROUTE)) if isinstance(first, dict) and first.get(ROUTE) is not None else None


def spill_to(ordered: list[str], in_flight: dict[str, int], slack: int = DEFAULT_SLACK) -> str:
    """The replica a row goes to: its home (``ordered[0]``, its rendezvous order), unless the
    home holds more than ``slack`` prompts in flight beyond the least loaded replica."""
    home = ordered[0]
    least = min(ordered, key=lambda r: in_flight.get(r, 0))  # ties: the earliest in the row's order
    return least if in_flight.get(home, 0) - in_flight.get(least, 0) > slack else home


def prompts_in(pending_request: Optional[PendingRequest]) -> int:
    """How many prompts an engine request carries (1 for any other request)."""
    first = pending_request.args[0] if pending_request is not None and pending_request.args else None
    return (len(first.get("prompts") or ()) or 1) if isinstance(first, dict) else 1


class RowAffinityRouter(FIFOMixin, RequestRouter):
    """Serve request router: a routing key's requests to its rendezvous-hash replica (or, when
    that one is far busier, the least loaded), the others as fallback."""

    def initialize_state(self, slack: int = DEFAULT_SLACK, **_) -> None:
        """Serve passes the deployment's ``request_router_kwargs``: ``slack``, the prompts a
        replica runs at once (see ``spill_to``)."""
        self.slack = slack

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        """Serve's news of the running replicas; their count is also recorded for the stages'
        ``clients.InFlightWindow`` (through the module: in a stage actor, names this module
        imported from ``clients`` were measured to be copies of the actor's own)."""
        super().update_replicas(replicas)
        clients.ROUTED_REPLICAS[self.app_name] = len(replicas)

    def _counts(self) -> tuple[dict[str, int], dict[str, tuple[str, int]]]:
        if not hasattr(self, "_in_flight"):
            self._in_flight: dict[str, int] = {}  # replica -> prompts this router has in flight there
            self._requests: dict[str, tuple[str, int]] = {}  # request id -> (replica, prompts)
        return self._in_flight, self._requests

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = request_route(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if key is None:
            return [candidate_replicas]
        order = rendezvous_order(key, list(by_id))
        first = spill_to(order, self._counts()[0], getattr(self, "slack", DEFAULT_SLACK))
        ordered = [by_id[first]] + [by_id[i] for i in order if i != first]
        return [[ordered[0]], ordered[1:]] if len(ordered) > 1 else [ordered]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        in_flight, requests = self._counts()
        weight = prompts_in(pending_request)
        requests[pending_request.metadata.internal_request_id] = (replica_id.unique_id, weight)
        in_flight[replica_id.unique_id] = in_flight.get(replica_id.unique_id, 0) + weight

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        in_flight, requests = self._counts()
        entry = requests.pop(internal_request_id, None)
        if entry is not None:
            in_flight[entry[0]] -= entry[1]
