"""Row affinity for the engine service: all requests of a row go to one replica.

The first-pass request of a row and its critique requests share the instruction prefix; on the
same replica, vLLM's prefix cache serves the shared part. Each request names a routing key
(the row id); replicas are ranked for it by rendezvous hashing (highest ``hash(key, replica)``
first), which is stable while the replica set is stable and moves only the keys of a replica
that comes or goes. A preferred replica that is full falls back to the others, least loaded
first, so affinity never blocks progress.
"""

from __future__ import annotations

import hashlib
from typing import List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from .clients import ROUTE


def rendezvous_order(key: str, replica_ids: list[str]) -> list[str]:
    """Replica ids ordered by their rendezvous hash with ``key`` (the first is the key's home)."""
    def score(replica_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")

    return sorted(replica_ids, key=score, reverse=True)


def route_key(pending_request: Optional[PendingRequest]) -> str | None:
    """The routing key a request carries, if any."""
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return str(first.get(ROUTE)) if isinstance(first, dict) and first.get(ROUTE) is not None else None


class RowAffinityRouter(FIFOMixin, RequestRouter):
    """Serve request router: a row's requests to its rendezvous-hash replica, others as fallback."""

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = route_key(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if key is None:
            return [candidate_replicas]
        ordered = [by_id[i] for i in rendezvous_order(key, list(by_id))]
        return [[ordered[0]], ordered[1:]] if len(ordered) > 1 else [ordered]
