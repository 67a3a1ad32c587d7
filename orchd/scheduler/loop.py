"""The scheduler process: receive a message, let the core decide, send what it says.

A plain blocking ``zmq.Poller`` loop: the core is synchronous and this process does nothing
else, so asyncio would only add cost. Timers (retention, drain deadline, peer liveness) run
on a 250 ms tick. Peer liveness is :class:`orchd.core.liveness.PeerClock`: judged on the
scheduler's waking time only (a paused scheduler judges nobody on its own pause), and a peer
taken as dead is asked to introduce itself again (``Rehello``) on its next message. Every
heartbeat the launcher is told how long ago each peer was heard (``PeersSeen``): its watchdog.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time

import msgspec
import zmq

from ipc import peers
from ipc import protocol as p
from ipc.peers import Peer
from ipc.proc import freeze_startup_heap
from orchd import log
from orchd.artifacts import answer as answer_artifact
from orchd.config import Resolved, load_resolved
from orchd.core import recovery
from orchd.core.errors import OrchdError
from orchd.core.liveness import Heard, PeerClock
from orchd.core.tasks import Out
from orchd.scheduler.build import build_core
from orchd.scheduler.journal import Journal, JournalError
from orchd.scheduler.metrics import SchedulerMetrics
from orchd.scheduler.models import Verifier, check_refs, model_roots
from orchd.scheduler.stores import CatalogDisk, make_store
from orchd.telemetry.nvml import NvmlCollector

TICK_S = 0.25
SUPERVISOR_PREFIX = str(peers.supervisor(""))
IDLE_TICK_S = 1.0  # (the launcher's watchdog allows for it: orchd/core/watchdog.py)
# A gap between loop turns longer than this is the scheduler not running (a turn polls for at
# most IDLE_TICK_S): that time is credited to every peer (orchd/core/liveness.py).
STALL_MS = 1_500
# A supervisor silent for this many heartbeats gets no new task and is not ready in health,
# well before it is taken as dead (server.peer_timeout_ms).
UNRESPONSIVE_HEARTBEATS = 2.5
EXEMPT = frozenset({str(peers.LAUNCHER)})  # the launcher sends no heartbeats


class _TraceIds(msgspec.Struct):
    task_id: str = ""


class _Trace(msgspec.Struct):
    """What the scheduler reads of a transcript: whose task it is."""

    content: _TraceIds = msgspec.field(default_factory=_TraceIds)


_trace = msgspec.json.Decoder(_Trace)


def _now_ms() -> float:
    return time.monotonic() * 1000.0


class SchedulerShell:
    def __init__(self, res: Resolved) -> None:
        cfg = res.config
        self.cfg = cfg
        self.core, self.control = build_core(cfg)
        self.control.wall_offset_ms = self.core.wall_offset_ms = time.time() * 1000.0 - _now_ms()
        self.gpus = NvmlCollector(cfg.replicas)
        self.metrics = SchedulerMetrics(self.core, self.gpus if self.gpus.available else None)
        self.store = make_store(cfg, res.runtime.run_dir)
        self.catalog_disk = CatalogDisk(self.core.catalog, cfg.catalog.catalog_dir)
        self.roots = model_roots(cfg.catalog, res.runtime.run_dir)
        self.verifier = Verifier(cfg.catalog, self.roots)
        # Admitted tasks and sessions, replayed now; supervisors get a few heartbeats' time
        # to re-announce the tasks they run before those count as lost.
        state_dir = cfg.server.state_dir or os.path.join(res.runtime.run_dir, "state")
        adopt_ms = cfg.server.peer_timeout_ms + 2 * cfg.server.heartbeat_ms
        self.journal = Journal(self.core, state_dir, _now_ms(), adopt_ms)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(res.runtime.scheduler_addr)
        self.clock = PeerClock(cfg.server.peer_timeout_ms, STALL_MS, _now_ms())
        self.unresponsive_ms = UNRESPONSIVE_HEARTBEATS * cfg.server.heartbeat_ms
        self.unresponsive: set[str] = set()  # replicas whose supervisors went quiet
        self.next_report = 0.0
        self.frontends: set[str] = set()
        self.announced = False
        self.running = True
        self.last_depth = -1
        self.outbox: dict[str, list[bytes]] = {}
        # Logged once the outbox is sent: what was admitted (or refused), what was placed.
        self.admissions: list[tuple[p.Submit, Out]] = []
        self.placed: list[tuple[str, p.Dispatch]] = []

    # ---------------------------------------------------------------- plumbing

    def send(self, out: Out) -> None:
        """Queue messages; :meth:`flush_out` sends each peer's as one ZeroMQ message."""
        for peer, msg in out:
            if isinstance(msg, p.Dispatch):
                self.placed.append((peer, msg))
            if peer:
                self.outbox.setdefault(peer, []).append(p.encode(msg))

    def flush_out(self) -> None:
        """Send, supervisors first (a dispatch starts the engine: the first token is what
        clients wait for), then log what was sent: nothing is formatted before a send."""
        box = self.outbox
        synced = False
        for peer in sorted(box, key=lambda peer: Peer(peer).role != "supervisor"):
            if not synced and Peer(peer).role != "supervisor":
                self.journal.sync(time.monotonic())  # on disk before the 202s that promise it
                synced = True
            frames = box[peer]
            try:
                self.sock.send_multipart([peer.encode(), *frames], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                log.warning("dropped messages to a peer", peer=peer, n=len(frames), error=str(e))
        box.clear()
        if not synced:
            self.journal.sync(time.monotonic())
        for submit, out in self.admissions:
            self._narrate_admission(submit, out)
        self.admissions.clear()
        for peer, d in self.placed:
            log.info(
                "placed",
                task_id=d.task.task_id,
                session_id=d.task.session_id,
                replica_id=Peer(peer).replica_id,
                queue_position=d.queue_position,
                predicted_start_ms=d.predicted_start_ms,
                why=d.placement_reason,
            )
        self.placed.clear()
        log.flush()

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        next_tick = time.monotonic() + TICK_S
        while self.running:
            # Round up: a sub-millisecond timeout would poll(0) and spin until the tick.
            timeout_ms = max(0, math.ceil((next_tick - time.monotonic()) * 1000))
            ready = poller.poll(timeout_ms)
            self._woke()  # (a pause most often falls inside the poll)
            if ready:
                # Take everything that is waiting before the next tick; what supervisors
                # report goes first (ROUTER queues each peer fairly, so a frontend's request
                # made after a task's end could otherwise come before that end's report).
                batch: list[tuple[str, list[bytes]]] = []
                for _ in range(256):
                    if not int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                        break  # (cheaper than a recv that raises zmq.Again)
                    ident, *frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    batch.append((ident.decode(), frames))
                batch.sort(key=lambda m: not m[0].startswith(SUPERVISOR_PREFIX))
                for peer, frames in batch:
                    for data in frames:
                        self.handle(peer, data)
            if time.monotonic() >= next_tick:
                # Tick fast while there is work (deadlines, retention), slowly when idle.
                busy = bool(self.core.tasks) or bool(self.control.reloads)
                next_tick = time.monotonic() + (TICK_S if busy else IDLE_TICK_S)
                self.tick()
            self.journal.commit(time.monotonic())  # written before anything is sent
            self.flush_out()
        self.journal.close()
        self.verifier.stop()
        self.sock.close(0)
        self.ctx.term()
        self.gpus.close()

    def _woke(self, now: float | None = None) -> None:
        """Before the socket is read, and before peers are judged: time this process did not
        run is nobody's silence."""
        stalled = self.clock.woke(_now_ms() if now is None else now)
        if stalled:
            log.warning(
                "the scheduler did not run for a while; peers are not judged on that time",
                stalled_ms=int(stalled),
            )

    def tick(self) -> None:
        now = _now_ms()
        self._woke(now)  # a pause that fell after this turn's read is credited too
        clock = self.clock
        for peer in clock.silent(now, EXEMPT):
            age = clock.age_ms(peer, now) or 0.0
            log.warning(
                "peer missed its heartbeats; treating it as dead", peer=peer, silent_ms=int(age)
            )
            self._peer_down(peer, f"no heartbeat for {age / 1000:.1f}s", now)
        self._responsiveness(now)
        if now >= self.next_report:
            self.next_report = now + self.cfg.server.heartbeat_ms
            self.send([(str(peers.LAUNCHER), p.PeersSeen(clock.ages(now)))])
        for model_id, digest, error in self.verifier.done():
            if model_id in self.core.catalog.models:
                wall = now + self.control.wall_offset_ms
                m = self.core.catalog.record_verification(model_id, digest, wall, error)
                log.info("model verified", model_id=model_id, verified=m.verified, error=error)
                self.metrics.verified(m.ref, m.verified, error)
                self.catalog_disk.save()
        if self.gpus.available:
            self._gpu_view()
        self.metrics.absorb()
        self.send(self.core.tick(now))
        self.send(recovery.overdue(self.core, now))
        self.send(self.control.tick(now))
        depth = len(self.core.queue)
        if depth != self.last_depth:
            self.last_depth = depth
            self.send([(peers.supervisor(r), p.QueueDepth(depth)) for r in self.core.replicas])

    def _gpu_view(self) -> None:
        """Free VRAM for placement and per-device figures for pool health, from the sampler."""
        free = self.gpus.free_vram_by_replica()
        samples = self.gpus.snapshot()
        rows = [{**dataclasses.asdict(s), **self.gpus.owners(s)} for s in samples]
        self.core.recent.gpus.observe(_now_ms(), rows)  # the operator page's GPU view
        for rep in self.core.replicas.values():
            rep.free_vram_bytes = free.get(rep.id, 0)
            rep.gpus = [
                {
                    "device": s.index,
                    "uuid": s.uuid,
                    "name": s.name,
                    "utilization": s.utilization,
                    "vram_used_bytes": s.vram_used,
                    "vram_total_bytes": s.vram_total,
                }
                for s in samples
                if rep.id in self.gpus.owners(s)["replica_id"].split(",")
            ]

    def _responsiveness(self, now: float) -> None:
        """A supervisor quiet past a few heartbeats gets no new task and is not ready in
        health; its next message makes it usable again."""
        for rid, rep in self.core.replicas.items():
            age = self.clock.age_ms(str(peers.supervisor(rid)), now)
            quiet = rep.connected and age is not None and age > self.unresponsive_ms
            if quiet and rid not in self.unresponsive:
                log.warning("supervisor is quiet; no new tasks for it", replica_id=rid)
                self.unresponsive.add(rid)
                rep.responsive = False

    def _heard(self, peer: str, msg: p.Message, now: float) -> None:
        """Note that ``peer`` spoke; ask an unknown peer to introduce itself."""
        clock = self.clock
        if isinstance(msg, p.Hello):
            return  # (handled by _hello)
        verdict = clock.heard(peer, now)
        if verdict is Heard.ASK and Peer(peer).role != "internal":
            log.info("message from a peer not known (now); asking it to say hello", peer=peer)
            self.send([(peer, p.Rehello())])
        if self.unresponsive and peer.startswith(SUPERVISOR_PREFIX):
            rid = Peer(peer).replica_id
            if rid in self.unresponsive:
                self.unresponsive.discard(rid)
                rep = self.core.replicas.get(rid)
                if rep is not None:
                    rep.responsive = True
                    log.info("supervisor is heard again", replica_id=rid)
                    self.send(self.core.dispatch(now))

    def _peer_down(self, peer: str, reason: str, now: float) -> None:
        self.clock.down(peer)
        self.frontends.discard(peer)
        self.metrics.left(peer, Peer(peer).frontend_index)
        self.send(self.core.peer_down(peer, reason, now))
        self.send(self.control.peer_down(peer))

    # ---------------------------------------------------------------- messages

    def handle(self, peer: str, data: bytes) -> None:
        try:
            msg = p.decode(data)
        except msgspec.DecodeError as e:
            log.error("undecodable message", peer=peer, error=str(e))
            return
        now = _now_ms()
        self._heard(peer, msg, now)
        core = self.core
        out: Out
        match msg:
            case p.Heartbeat():
                self.control.progress(msg.progress)
                return
            case p.Submit():
                log.bind_task(msg.task.task_id, msg.task.cid)
                out = core.submit(peer, msg, now)
                self.admissions.append((msg, out))
            case p.Subscribe():
                out = core.subscribe(peer, msg, now)
            case p.Claim():
                out = core.claim(peer, msg, now)
            case p.Unsubscribe():
                out = core.unsubscribe(peer, msg, now)
            case p.Cancel():
                out = core.cancel(peer, msg, now)
                log.info("cancel requested", task_id=msg.task_id, reason=msg.reason)
            case p.FenceDone():
                out = core.fence_done(peer, msg, now)
            case p.AbortDone():
                out = core.abort_done(peer, msg, now)
            case p.TaskEnded():
                out = core.task_ended(peer, msg, now)
            case p.PutArtifact():
                self.store.put(msg.doc, self._transcript_owner(msg.doc))
                return
            case p.Query():
                out = self.query(peer, msg, now)
            case p.ReloadReady():
                out = self.control.reload_ready(peer, msg, now)
            case p.ReplicaStatus():
                out = core.replica_status(peer, msg, now)
                self.gpus.set_engine_version(msg.replica_id, msg.engine_version)
                rep = core.replicas.get(msg.replica_id)
                log.info(
                    "replica is ready" if rep is not None and rep.ready else "replica is not ready",
                    replica_id=msg.replica_id,
                    engine_version=msg.engine_version,
                    last_error=rep.last_error if rep is not None else msg.last_error,
                )
                self._maybe_announce()
            case p.Hello():
                out = self._hello(peer, msg, now)
            case p.Running():
                out = recovery.running(core, peer, msg, now)
                log.info("tasks re-announced", peer=peer, tasks=len(msg.tasks))
            case p.Streams():
                out = recovery.streams(core, peer, msg, now)
            case p.Goodbye():
                self._peer_down(peer, f"said goodbye: {msg.reason}", now)
                return
            case p.PeerDown():
                self._peer_down(msg.ident, msg.reason, now)
                return
            case p.DrainAll():
                log.info("draining: admission closed", deadline_ms=msg.deadline_ms)
                out = core.drain_all(peer, msg, now)
            case p.FrontendStats():
                self.metrics.native.frontend_stats(msg)
                return
            case p.MetricsQuery():
                out = [(peer, p.MetricsText(msg.req_id, self.metrics.render()))]
            case _:
                log.warning("unexpected message", peer=peer, type=type(msg).__name__)
                return
        self.send(out)

    def _transcript_owner(self, doc: bytes) -> str:
        """A transcript belongs to the key of its task (no task known: to nobody)."""
        try:
            tid = _trace.decode(doc).content.task_id
        except msgspec.DecodeError:
            return ""
        t = self.core.tasks.get(tid)
        return t.spec.api_key_id if t is not None else ""

    def _catalog_ref(self, ref_or_id: str) -> str:
        m = self.core.catalog.resolve(ref_or_id)
        return m.ref if m is not None else ref_or_id

    def query(self, peer: str, q: p.Query, now: float) -> Out:
        if q.op.startswith("artifact."):
            try:
                status, body = answer_artifact(self.store, q.op, q.args, q.key)
            except OrchdError as e:
                return [(peer, p.Failed(q.req_id, self.core.error_info(e)))]
            return [(peer, p.Reply(q.req_id, body, status))]
        try:
            check_refs(q.op, q.args, self.roots, self._catalog_ref)
            if q.op == "catalog.verify":
                self.verifier.check_room(q.args["model_id"])
        except OrchdError as e:
            return [(peer, p.Failed(q.req_id, self.core.error_info(e)))]
        if q.op == "catalog.delete":
            self.verifier.cancel(q.args["model_id"])
        out = self.control.handle(peer, q, now)
        if q.op.startswith("catalog.") and q.op not in ("catalog.get", "catalog.list"):
            ok = any(isinstance(m, p.Reply) for _, m in out)
            if ok:
                self.catalog_disk.save()
                if q.op == "catalog.verify":
                    m = self.core.catalog.models[q.args["model_id"]]
                    algo = (m.digest or "sha256:").partition(":")[0]
                    self.verifier.start(m.id, m.ref, algo)
        if q.op.startswith("pool.") or q.op.startswith("catalog."):
            log.info("control", op=q.op, args={k: v for k, v in q.args.items() if k != "doc"})
        return out

    def _hello(self, peer: str, msg: p.Hello, now: float) -> Out:
        if msg.version != p.PROTOCOL_VERSION:
            reason = f"protocol v{msg.version} spoken, v{p.PROTOCOL_VERSION} expected"
            log.error("refused a peer", peer=peer, reason=reason)
            return [(peer, p.Welcome(accepted=False, reason=reason))]
        out: Out = []
        known = peer in self.clock.known
        met = peer in self.clock.pids
        restarted = self.clock.hello(peer, msg.pid, now)
        self.metrics.joined(peer, msg)
        if msg.role == "supervisor":
            rep = self.core.replicas.get(msg.replica_id)
            if rep is not None and restarted and (rep.active or rep.ready):
                # A new incarnation: whatever the old one ran is lost.
                out += self.core.peer_down(peer, "supervisor restarted", now)
            if rep is not None and (restarted or not known):
                # Taken back (it was taken as dead, or this scheduler is new): what the same
                # process still runs of the tasks failed when it was taken as dead is aborted.
                out += self.core.rejoined(msg.replica_id, now, same_process=not restarted)
            if rep is not None:
                rep.connected = True
                rep.responsive = True
                self.unresponsive.discard(msg.replica_id)
        elif msg.role == "frontend":
            self.frontends.add(peer)
        back = met and not restarted and not known
        log.info("peer rejoined" if back else "peer joined", peer=peer, role=msg.role, pid=msg.pid)
        self.send([(peer, p.Welcome()), *out])
        self._maybe_announce()  # the launcher may be the last to say hello
        return []

    def _maybe_announce(self) -> None:
        """Ready once every frontend is up and every replica has reported (ready, or failing
        with its reason: a broken engine must not keep the rest of orchd from serving)."""
        reps = self.core.replicas.values()
        reported = all(r.ready or r.last_error for r in reps)
        launcher_known = "launcher" in self.clock.known
        if (
            not self.announced
            and launcher_known
            and reported
            and len(self.frontends) >= self.cfg.server.frontends
        ):
            self.announced = True
            ready = sum(1 for r in reps if r.ready)
            self.send([("launcher", p.ClusterReady(len(self.frontends), ready))])

    def _narrate_admission(self, msg: p.Submit, out: Out) -> None:
        t = msg.task
        for _, m in out:
            if isinstance(m, p.Admitted):
                log.info(
                    "admitted",
                    task_id=t.task_id,
                    session_id=t.session_id,
                    engine=t.engine,
                    model=t.model_ref,
                    priority=t.priority,
                    api=t.api,
                    queue_position=m.queue_position,
                    predicted_start_ms=m.predicted_start_ms,
                )
            elif isinstance(m, p.Failed):
                log.info("rejected", task_id=t.task_id, code=m.error.code, message=m.error.message)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    res = load_resolved(argv[0])
    log.setup("scheduler", res.config.server.log_level, res.config.server.log_format)
    log.defer()  # flushed once per loop turn
    try:
        shell = SchedulerShell(res)
    except JournalError as e:
        log.error("scheduler cannot start", error=str(e))
        log.flush()
        return 1

    def _stop(signum: int, frame: object) -> None:
        shell.running = False

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when we stop
    log.info("scheduler listening", addr=res.runtime.scheduler_addr)
    freeze_startup_heap()
    shell.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
