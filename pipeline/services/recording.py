"""Engine requests with their outputs, as JSON lines: what an engine replica served.

With ``debug.record_engine_requests`` set, every engine replica appends one line per prompt
it answered: the prompt's token ids, its budget and stop ids, and the continuation (token ids,
reflection-token logprobs per position, cumulative logprob, text) or the error string. The
benchmark replays the requests on a bare engine; the simulated engine
(``pipeline.services.simulated_engine``) answers from the outputs.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Sequence

from ..selfrag.scoring import Continuation


def request_key(prompt: Sequence[int], max_tokens: int, stop_ids: Sequence[int]) -> tuple:
    """What identifies a request: greedy decoding makes its output a function of this."""
    return tuple(prompt), int(max_tokens), tuple(stop_ids)


def record_line(prompt: Sequence[int], max_tokens: int, stop_ids: Sequence[int], out: Continuation | str) -> str:
    """One recorded request and its output, as a JSON line."""
    record = {"prompt": list(prompt), "max_tokens": int(max_tokens), "stop_ids": list(stop_ids)}
    if isinstance(out, str):
        record["error"] = out
    else:
        record.update(token_ids=list(out.token_ids), logprobs=[[[t, lp] for t, lp in pos.items()] for pos in out.logprobs],
                      cumulative_logprob=out.cumulative_logprob, text=out.text)
    return json.dumps(record) + "\n"


def output_of(record: dict) -> Continuation | str:
    """The recorded output of a request: its Continuation, or its error string."""
    if "error" in record:
        return record["error"]
    return Continuation(token_ids=record["token_ids"], logprobs=[{int(t): lp for t, lp in pos} for pos in record["logprobs"]],
                        cumulative_logprob=record["cumulative_logprob"], text=record["text"])


def read_records(directory: str | Path) -> list[dict]:
    """Every recorded request under ``directory`` (the files of all replicas, in name order)."""
    records = []
    for path in sorted(Path(directory).glob("requests-*.jsonl")):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


class Recorder:
    """Appends the requests one replica serves to a file of its own under ``directory``."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self._file = open(os.path.join(directory, f"requests-{uuid.uuid4().hex}.jsonl"), "a")

    def write(self, prompts, budgets, stop_ids, outs) -> None:
        """Record one call: its prompts with their budgets, the stop ids, and the outputs."""
        self._file.write("".join(record_line(p, b, stop_ids, o) for p, b, o in zip(prompts, budgets, outs)))

    def flush(self) -> None:
        """Make what was recorded so far readable by others."""
        self._file.flush()
