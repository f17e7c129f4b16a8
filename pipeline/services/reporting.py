"""How a service replica reports: running counters sent to the job's metrics actor every few
seconds, soon after it runs out of calls, and as it shuts down; never one actor call per request."""

from __future__ import annotations

import asyncio
import time

#: How often a replica reports its counters to the job's metrics actor, in seconds.
REPORT_EVERY_S = 2.0
#: A replica with no call in flight reports at most this long after its last call ended (and
#: not more often): a job that reuses a running service then has its counters at once.
IDLE_REPORT_AFTER_S = 0.25


class ReportingReplica:
    """What every service replica does besides generating: it sends its counters to the job's
    metrics actor every ``REPORT_EVERY_S``, when it has run out of calls and as it shuts down;
    counts its calls (``calls``, which the job compares with the calls its stages made), keeps
    the window of its requests (first start, last end), and (an engine replica) records what it
    serves when asked to."""

    def announce(self, stage: str, metrics: str | None) -> None:
        """Tell the metrics actor named ``metrics`` (the deploying job's) that a replica of
        ``stage`` is starting: its process runs, its model is loading (the job then starts its
        stages beside it)."""
        from ..runtime import phases
        from ..runtime.metrics_actor import Reporter

        self.reporter = Reporter(stage, target=metrics)
        self.reporter.report(starting_at=time.time())
        if stage == "engine":
            phases.reached("engine_start")  # test hook: an engine replica that never gets ready

    def count_into(self, totals: dict) -> None:
        """Keep this replica's running counters in ``totals``, ``calls`` among them; no request
        in flight yet and an empty window."""
        self.totals = totals
        totals.setdefault("calls", 0)
        self._reported = dict(totals)
        self.window: dict[str, float] = {}  # first request start, last request end (epoch seconds)
        self._in_flight, self._idle_report, self._last_report = 0, None, 0.0

    def start_reporting(self, totals: dict, init_seconds: float, record_requests: str | None = None) -> None:
        """After ``announce``: report the start-up, then ``totals`` (running counters) as they
        grow; record the requests served under ``record_requests`` (a local directory) when set."""
        from .recording import Recorder

        self.reporter.report(init_seconds=init_seconds, startups=1, ready_at=time.time())
        self.count_into(totals)
        self._recorder = Recorder(record_requests) if record_requests else None
        self._report_task = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            self.flush_counters()

    def begin(self, metrics: str | None) -> None:
        """A request starts: it names the metrics actor of the job that sent it (a service
        reused by later jobs reports to the latest, from its first request on)."""
        if metrics and metrics != self.reporter.target:
            self.flush_counters()  # what was served so far goes to the job before
            self.window = {}
            self.reporter.follow(metrics)
        self.window.setdefault("first_start", time.time())
        self.totals["calls"] += 1
        self._in_flight += 1

    def end(self) -> None:
        """A request ended; with none left in flight, a report follows within ``IDLE_REPORT_AFTER_S``."""
        self.window["last_end"] = time.time()
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle_report is None:
            delay = max(0.0, self._last_report + IDLE_REPORT_AFTER_S - time.monotonic())
            self._idle_report = asyncio.get_running_loop().call_later(delay, self._report_idle)

    def _report_idle(self) -> None:
        self._idle_report = None
        self.flush_counters()

    def record(self, prompts, budgets, stop_ids, outs) -> None:
        """Record a call's prompts and outputs (when recording)."""
        if self._recorder is not None:
            self._recorder.write(prompts, budgets, stop_ids, outs)

    def flush_counters(self, wait: bool = False) -> None:
        """Send the counters' growth since the last report to the metrics actor (``wait``: until
        it has them)."""
        self._last_report = time.monotonic()
        now = dict(self.totals)
        delta = {k: now[k] - self._reported.get(k, 0) for k in now}
        if any(delta.values()):
            self.reporter.report(wait=wait, **delta, **self.window)
            self._reported = now
        if self._recorder is not None:
            self._recorder.flush()

    def stop_reporting(self) -> None:
        """The last report, awaited: the job deletes its services, then reads the metrics."""
        task, self._report_task = getattr(self, "_report_task", None), None
        if task is not None:
            task.cancel()
            self.flush_counters(wait=True)
