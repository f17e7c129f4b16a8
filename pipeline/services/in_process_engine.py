"""The engine of a run in one process (``runner=in_process``): vLLM's synchronous ``LLMEngine``,
stepped on the replica's own thread, behind ``EngineReplica``'s interface.

``AsyncLLM`` (the engine service's engine) always runs its engine core in a second process. For
a small job on one machine that is most of the fixed cost the bare engine does not pay
(measured on a 120-row job on 2 cores: 6 s more to start, and 3 s at exit while that process
tears down). ``LLMEngine`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the default
``engine.env``) keeps it in this process, as ``jobs.bare_engine`` does. Requests still batch
continuously: a call adds its prompts to the engine, and one stepping task runs engine steps
while any request is unfinished, handing each finished output to its caller; calls that arrive
meanwhile join the steps under way (continuous batching, as in ``AsyncLLM``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Sequence

from ..selfrag.scoring import Continuation
from .engine import EngineReplica, EngineUnavailable


class InProcessEngineReplica(EngineReplica):
    """``EngineReplica`` over a synchronous ``LLMEngine`` (see the module docstring)."""

    def start_engine(self, model: str, kwargs: dict):
        """An ``LLMEngine`` in this process (statistics on: the counters are a stat logger)."""
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.waiting: dict[str, asyncio.Future] = {}
        self.failure: BaseException | None = None
        self._stepping: asyncio.Task | None = None
        # no loading bar: in one process it would draw on the job's console (engine.extra may ask for it)
        args = EngineArgs(model=model, disable_log_stats=False, **{"use_tqdm_on_load": False, **kwargs})
        return LLMEngine.from_engine_args(args, stat_loggers=[self.counters.factory])

    def dead(self) -> bool:
        return self.failure is not None

    async def _one(self, prompt_ids: Sequence[int], max_tokens: int, stop_ids: Sequence[int],
                   priority: int = 0) -> Continuation:
        from vllm.inputs import TokensPrompt

        from ..model.vllm_engine import sampling_params, to_continuation

        if self.dead():  # failed while this call waited for its turn
            raise EngineUnavailable(f"the in-process engine failed: {self.failure}")
        params = sampling_params(self.ids, max_tokens, stop_ids, final_only=True, detokenize=False)
        request_id, done = uuid.uuid4().hex, asyncio.get_running_loop().create_future()
        self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt_ids)), params,
                                priority=priority)
        self.waiting[request_id] = done
        if self._stepping is None or self._stepping.done():
            self._stepping = asyncio.get_running_loop().create_task(self._step())
        try:
            final = await done
        except asyncio.CancelledError:  # the caller gave up (the run stops): the engine drops the request
            if self.waiting.pop(request_id, None) is not None and self.engine is not None:
                self.engine.abort_request([request_id])
            raise
        return to_continuation(final.outputs[0], self._reflection, self.decode)

    async def _step(self) -> None:
        """Engine steps while any request is unfinished; between steps, the calls waiting on this
        thread's loop add their requests. A step that fails fails every waiting request
        (``EngineUnavailable``) and the engine is dead."""
        try:
            await asyncio.sleep(0)  # the rest of the call that started stepping joins the first step
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    waiting = self.waiting.pop(out.request_id, None) if out.finished else None
                    if waiting is not None and not waiting.done():
                        waiting.set_result(out)
                await asyncio.sleep(0)
        except Exception as exc:  # noqa: BLE001 - the engine is gone: its callers learn why
            self.failure = exc
            for waiting in self.waiting.values():
                if not waiting.done():
                    waiting.set_exception(EngineUnavailable(f"the in-process engine failed: {type(exc).__name__}: {exc}"))
            self.waiting.clear()

    def close(self) -> None:
        """The last report, then the engine's shutdown (once)."""
        stepping = getattr(self, "_stepping", None)
        if stepping is not None:
            stepping.cancel()
        self.stop_reporting()
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.engine_core.shutdown()
