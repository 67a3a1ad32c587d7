"""What a supervisor holds, as it re-announces it to a (restarted) scheduler after each
``Hello``: its running tasks and the ended ones whose transcripts it keeps
(:class:`ipc.reannounce.Running`). The scheduler adopts them instead of dispatching them
again (orchd/core/recovery.py)."""

from __future__ import annotations

from collections.abc import Iterable

from engine_procs.runs import Run
from ipc import protocol as p


def running(replica_id: str, runs: Iterable[Run], ended: Iterable[Run]) -> p.Running:
    tasks = [
        p.RunningTask(
            r.task_id,
            r.frontend,
            r.slot,
            r.stream.value,
            r.tokens,
            r.tokens_in,
            ended=r.ended,
            reason=r.end_reason,
            error_code=r.error_code,
        )
        for group in (runs, ended)
        for r in group
    ]
    return p.Running(replica_id, tasks)
