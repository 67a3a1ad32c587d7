"""How a scheduler core survives its own restart (pure; the file is
``orchd/scheduler/journal.py``).

- :func:`take`: what the journal is to record this loop turn (the core's task records and the
  sessions that changed), and :func:`snapshot`: the records that say everything the core
  knows, written when the journal is compacted.
- :func:`restore`: a new core takes the replayed journal over. Queued tasks are queued again in
  their order; started ones wait for their supervisor (``adopting``); tasks ended within
  their retention are kept, so a late ``GET .../stream`` still finds them.
- :func:`running`: a supervisor's ``Running`` re-announce. Its tasks are adopted as they run
  (never dispatched twice); a task placed on that replica and not listed was lost with an
  earlier process and ends with a retriable ``WORKER_RESET``.
- :func:`streams`: a frontend's ``Streams`` re-announce: who streams each task again.
- :func:`overdue`: started tasks whose supervisor never re-announced end the same way.
"""

from __future__ import annotations

from ipc import protocol as p
from ipc.peers import Peer
from orchd.core.errors import Code, OrchdError
from orchd.core.journal import Admit, End, Record, Replayed, SessionGone, SessionRec, Start
from orchd.core.ownership import Ev, Stream, step
from orchd.core.queue import QueueFull
from orchd.core.scheduler import SchedulerCore
from orchd.core.sessions import Grant, Session
from orchd.core.tasks import Out, State, Task, sup

UNFED = frozenset({Stream.NONE, Stream.PROVISIONAL, Stream.PROVISIONAL_ENDED})
LOST = "the task's engine process died with orchd; submit it again"


def _session_rec(s: Session, off: float) -> SessionRec:
    return SessionRec(
        s.id,
        s.owner,
        s.created_ms + off,
        s.last_used_ms + off,
        s.ttl_ms,
        s.tokens_left,
        s.time_left_ms,
        s.cost_left,
        s.turns,
        s.kv_bytes,
        s.last_replica,
        s.reserved_tokens,
        s.reserved_cost,
        s.active,
    )


def take(core: SchedulerCore) -> list[Record]:
    """The records made since the last call: task records, then each changed session."""
    out = core.records
    core.records = []
    table = core.sessions
    if table.dirty:
        off = core.wall_offset_ms
        for sid in table.dirty:
            s = table.sessions.get(sid)
            out.append(SessionGone(sid) if s is None else _session_rec(s, off))
        table.dirty.clear()
    return out


def snapshot(core: SchedulerCore) -> list[Record]:
    """Every record needed to rebuild what the core knows now (for compaction): each task
    (queued, running, or ended and still retained) and each session."""
    off = core.wall_offset_ms
    out: list[Record] = []
    for t in core.tasks.values():
        tid = t.spec.task_id
        out.append(Admit(t.spec, t.enqueued_ms + off))
        if t.replica:
            out.append(Start(tid, t.replica, t.started_ms + off))
        if t.state is State.ENDED:
            out.append(End(tid, t.end_reason, t.ended_ms + off, t.error))
    out += [_session_rec(s, off) for s in core.sessions.sessions.values()]
    return out


def _lost(core: SchedulerCore, t: Task) -> p.ErrorInfo:
    r = core.replicas.get(t.replica)
    return p.ErrorInfo(
        Code.WORKER_RESET.value,
        LOST,
        engine=r.engine if r is not None else None,
        pool_id=r.pool_id if r is not None else None,
        retry_after_ms=1000,
    )


def restore(core: SchedulerCore, state: Replayed, now: float, adopt_ms: float) -> None:
    """Take over a replayed journal. Started tasks wait ``adopt_ms`` for their supervisor."""
    off = core.wall_offset_ms
    table = core.sessions
    for rec in state.sessions.values():
        created, used = rec.created_ms - off, rec.last_used_ms - off
        s = Session(rec.id, rec.owner, created, used, rec.ttl_ms, rec.tokens_left, rec.time_left_ms,
                    rec.cost_left, rec.turns, rec.kv_bytes, rec.last_replica,
                    rec.reserved_tokens, rec.reserved_cost, rec.active)  # fmt: skip
        table.restore(s)
    core.adopt_until = now + adopt_ms
    for e in state.tasks.values():
        spec = e.spec
        if e.end is not None:
            ended = e.end.at_ms - off
            if ended + core.retention_ms <= now:
                continue  # past its retention: forgotten, as it would have been
            t = Task(spec, e.admitted_ms - off, 0, 0, replica=e.replica, state=State.ENDED)
            t.started_ms, t.ended_ms = e.started_ms - off, ended
            t.end_reason, t.error = e.end.reason, e.end.error
            core.tasks[spec.task_id] = t
            core._ended.append((ended, spec.task_id))
            continue
        grant = None
        if spec.session_id in table.sessions:
            grant = Grant(spec.session_id, spec.max_tokens, spec.max_tokens * core.cost_per_token)
        t = Task(spec, e.admitted_ms - off, 0, 0, grant=grant)
        core.tasks[spec.task_id] = t
        try:
            t.model_ref = core.catalog.check(spec.model_ref)
            pools = core.pools.targets(
                spec.engine, t.model_ref, spec.workload, spec.placement,
                spec.sampler_profile_version,
            )  # fmt: skip
            t.pools = [x.id for x in pools]
            if e.replica:
                if e.replica not in core.replicas:
                    raise OrchdError(Code.WORKER_RESET, f"replica {e.replica} is gone")
                t.state, t.replica, t.started_ms = State.RUNNING, e.replica, e.started_ms - off
                core.adopting[spec.task_id] = e.replica
            else:
                t.queue_position = core.queue.push(
                    spec.task_id, spec.priority, None, spec.api_key_id
                ).position
        except (OrchdError, QueueFull) as err:
            # The config changed under it (its pool, model or replica is gone, the queue is
            # smaller): it ends now, with the reason, for a GET to find.
            info = (
                core.error_info(err)
                if isinstance(err, OrchdError)
                else p.ErrorInfo(Code.ADMISSION_REJECT.value, "the queue is full after a restart")
            )
            if t.state is State.RUNNING:
                core.adopting.pop(spec.task_id, None)
            core._end(t, "error", now, info)


def _stream_of(t: Task, a: p.RunningTask, out: Out) -> None:
    """Who streams ``t``, as its supervisor says. A client's stream its frontend re-announced
    first wins: the supervisor is told what the old scheduler could not tell it (a claim, or
    an attach)."""
    theirs = Stream(a.stream)
    tid = t.spec.task_id
    if t.stream in (Stream.SUBSCRIBED, Stream.ATTACHED) and theirs in UNFED:
        if theirs is Stream.PROVISIONAL and (t.frontend, t.slot) == (a.frontend, a.slot):
            out.append((sup(t.replica), p.Claim(tid)))
        else:
            out.append((sup(t.replica), p.Attach(tid, t.frontend, t.slot)))
        t.stream = Stream.ATTACHED
        return
    t.frontend, t.slot, t.stream = a.frontend, a.slot, theirs


def running(core: SchedulerCore, peer: str, msg: p.Running, now: float) -> Out:
    """Adopt what the supervisor of ``msg.replica_id`` holds; end what it lost."""
    r = core.replicas.get(msg.replica_id)
    if r is None:
        return []
    out: Out = []
    listed = set()
    for a in msg.tasks:
        tid = a.task_id
        listed.add(tid)
        t = core.tasks.get(tid)
        if t is None or (t.state is State.ENDED and not a.ended):
            if not a.ended:  # not ours (or ended here already): stop it there
                out.append((peer, p.Abort(core.next_id(), tid, "shutdown")))
            continue
        if t.state is State.ENDED:
            # Its transcript is kept there for a replay unless a client already read it.
            t.replayable = t.replica == r.id and Stream(a.stream) in UNFED
            continue
        if core.adopting.get(tid) != r.id:
            continue  # queued here, or running elsewhere: not this supervisor's to report
        del core.adopting[tid]
        r.active.add(tid)
        _stream_of(t, a, out)
        if a.ended:  # it ended while no scheduler listened
            error = p.ErrorInfo(a.error_code, a.reason) if a.error_code else None
            core._end(t, a.reason, now, error, a.tokens_in, a.tokens)
            core._ended_in_ring(t)
            t.replayable = Stream(a.stream) in UNFED
            core._settle(t, out)
    for tid, rid in list(core.adopting.items()):
        if rid == r.id and tid not in listed:
            del core.adopting[tid]
            t = core.tasks[tid]
            core.fail_task(t, _lost(core, t), now, out)
    return out


def streams(core: SchedulerCore, peer: str, msg: p.Streams, now: float) -> Out:
    """A frontend's open streams, re-announced to a restarted scheduler."""
    index = Peer(peer).frontend_index
    out: Out = []
    for h in msg.streams:
        t = core.tasks.get(h.task_id)
        if t is None:
            err = p.ErrorInfo(Code.WORKER_RESET.value, LOST, retry_after_ms=1000)
            out.append((peer, p.StreamFail(0, h.slot, h.task_id, err)))
            continue
        if t.stream is not Stream.NONE:
            if h.claimed and (t.frontend, t.slot) == (index, h.slot):
                out += core.claim(peer, p.Claim(h.task_id), now)  # (a no-op unless unclaimed)
            continue
        reported = t.state is State.RUNNING and h.task_id not in core.adopting
        if reported and not h.claimed:
            # Its supervisor feeds nobody: the provisional stream is let go (a GET
            # subscribes the ordinary way).
            out.append((peer, p.Release(h.task_id, h.slot)))
            continue
        t.frontend, t.slot = index, h.slot
        t.stream = step(Stream.NONE, Ev.SUBSCRIBE if h.claimed else Ev.OPEN)
        if t.state is State.RUNNING and h.claimed:
            t.stream = step(t.stream, Ev.ATTACH)  # its supervisor feeds it, or is told to:
            if reported:
                out.append((sup(t.replica), p.Attach(h.task_id, index, h.slot)))  # (replays)
        elif t.state is State.ENDED and t.replayable and t.stream is Stream.SUBSCRIBED:
            t.stream = step(step(t.stream, Ev.ATTACH), Ev.TERMINAL)
            out.append((sup(t.replica), p.Attach(h.task_id, index, h.slot)))
        elif t.state is State.ENDED:
            core._terminal_by_frontend(t, out)
    return out


def overdue(core: SchedulerCore, now: float) -> Out:
    """Started tasks no supervisor re-announced in time: lost."""
    out: Out = []
    if not core.adopting or now < core.adopt_until:
        return out
    for tid in list(core.adopting):
        t = core.tasks[tid]
        del core.adopting[tid]
        core.fail_task(t, _lost(core, t), now, out)
    return out
