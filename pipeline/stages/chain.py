"""The model stages of a run, in order, and the Ray Data actor that chains them (``stages.chain``).

``ChainStage`` runs first pass, retrieve and critique one after another on each batch, in one
actor: a row crosses Ray Data once on its way to the writer, not three times (each crossing a
block pickled into the object store and read back, and an operator for the streaming executor
to schedule), and one actor process calls the services instead of three. The stages keep their
own logic, contracts, clients and metrics.
"""

from __future__ import annotations

import pyarrow as pa

from ..infra.config import Config, model_stages
from .common import InFlightLimit, ServiceStage
from .critique import CritiqueStage
from .first_pass import FirstPassStage
from .retrieve import RetrieveStage

#: The Ray Data actor of each model stage, by its name under ``stages``.
STAGE_ACTORS: dict[str, type[ServiceStage]] = {
    "first_pass": FirstPassStage, "retrieve": RetrieveStage, "critique": CritiqueStage}


def stage_kinds(cfg: Config) -> list[type[ServiceStage]]:
    """The run's model stages, in chain order (``ServiceStage`` classes)."""
    return [STAGE_ACTORS[name] for name in model_stages(cfg.selfrag.mode)]


async def run_chain(stages, batch: pa.Table) -> pa.Table:
    """``batch`` through each of ``stages`` in turn."""
    for stage in stages:
        batch = await stage(batch)
    return batch


class ChainStage:
    """Callable class for ``map_batches``: the run's model stages on each batch, in one actor."""

    def __init__(self, cfg: Config, tokenizer, engine_app: str | None, retriever_app: str | None,
                 batches_in_flight: int | None = None):
        """As ``ServiceStage``: ``tokenizer`` the model's ``TokenizerSpec``, the apps the services'
        Serve applications, ``batches_in_flight`` how many batches may be in the chain at once."""
        self.stages = [kind(cfg, tokenizer, engine_app, retriever_app) for kind in stage_kinds(cfg)]
        self.in_flight = InFlightLimit(batches_in_flight)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        async with self.in_flight.slot():
            return await run_chain(self.stages, batch)
