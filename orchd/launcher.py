"""``orchd serve``: make the rings and sockets, start every process, keep them alive, and on
SIGTERM drain, stop them all and leave nothing behind.

Children: one scheduler, one engine supervisor per replica, F frontends. Each runs as
``python -m <module> <run_dir>/config.json [index]``, in its own session (so a terminal's
Ctrl-C reaches only the launcher) and with a parent-death signal (so nothing outlives a
launcher killed with -9). The first SIGINT or SIGTERM drains; a second SIGINT (Ctrl-C again)
kills every child at once and exits 130. When to restart a child that died is orchd's one restart rule
(:class:`orchd.core.restart.RestartGroup`): exponential backoff and a circuit breaker per child,
and if the scheduler dies, every child is restarted with it, since the others' state hangs on it.
A child alive but silent past ``server.watchdog_ms`` (:class:`orchd.core.watchdog.Watchdog`:
the scheduler is heard on the launcher's own link, the others through the scheduler's
``PeersSeen`` reports) is killed with SIGKILL and so restarted by the same rule.

A launcher killed with SIGKILL cannot clean up: the next start removes what it left (its rings
in /dev/shm, its run directory under the temp dir, or the sockets in a configured run_dir),
once the pid in the run directory's ``launcher.pid`` is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import zmq

from ipc import peers
from ipc import protocol as p
from ipc.doorbell import create_bell
from ipc.peers import Peer
from ipc.proc import die_with_parent, listen_socket
from ipc.ring import HEADER_BYTES, create_ring, shm_free_bytes, unlink_ring
from orchd import log
from orchd.config import Config, ConfigError, Resolved, Runtime, child_env, write_resolved
from orchd.core.restart import RestartGroup, RestartPolicy
from orchd.core.watchdog import Watchdog
from orchd.telemetry.gpus import expand_gpus

LEADER = "scheduler"  # every other child restarts with it
WATCH_S = 0.5  # the watchdog is checked at least this often
PID_FILE = "launcher.pid"  # in the run directory: whose it is (stale once that pid is gone)
RUN_DIR_PREFIX = "orchd-"  # of run directories made under the temp dir


@dataclass
class Child:
    name: str  # also its peer identity at the scheduler
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None


class Launcher:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.children: dict[str, Child] = {}
        self.rings: list[str] = []
        self.made_run_dir = False
        self.stopping = False
        self.forced = False  # a second Ctrl-C: kill everything now
        self.guard: socket.socket | None = None
        self.group: RestartGroup | None = None  # made with the children, in prepare()
        try:
            s = cfg.server
            self.watchdog = Watchdog(LEADER, s.watchdog_ms / 1000.0, s.heartbeat_ms / 1000.0)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.killed: dict[str, str] = {}  # child -> why the watchdog killed it

    # ---------------------------------------------------------------- set-up

    def prepare(self) -> Resolved:
        cfg = self.cfg
        s, lim = cfg.server, cfg.limits
        reclaim_stale_rings()
        reclaim_stale_run_dirs(tempfile.gettempdir())
        nrings = len(cfg.replicas) * s.frontends
        need = nrings * (lim.ring_bytes + HEADER_BYTES)
        free = shm_free_bytes()
        if free is not None and free < need:
            raise ConfigError(
                f"/dev/shm has {free >> 20} MiB free but orchd needs {need >> 20} MiB for "
                f"{nrings} rings of {lim.ring_bytes >> 20} MiB: lower limits.ring_bytes, run "
                "fewer frontends or replicas, or enlarge /dev/shm"
            )
        # Reserve the port (port 0 picks one): frontends join it with SO_REUSEPORT. First make
        # sure nobody holds it: SO_REUSEPORT would otherwise let a second orchd share it.
        try:
            if s.port:
                probe = socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET)
                # SO_REUSEADDR (not SO_REUSEPORT): a live listener still refuses the bind,
                # but the TIME-WAIT sockets a clean stop leaves behind do not.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((s.host, s.port))
                finally:
                    probe.close()
            self.guard = listen_socket(s.host, s.port)
        except OSError as e:
            raise ConfigError(f"cannot bind {s.host}:{s.port}: {e.strerror}") from e
        fixed_port = bool(s.port)
        s.port = self.guard.getsockname()[1]
        if s.run_dir:
            os.makedirs(s.run_dir, mode=0o700, exist_ok=True)
            run_dir = s.run_dir
            reclaim_run_dir(run_dir)
        else:
            run_dir = tempfile.mkdtemp(prefix=RUN_DIR_PREFIX)
            self.made_run_dir = True
        self.run_dir = run_dir
        with open(os.path.join(run_dir, PID_FILE), "w") as f:
            f.write(f"{os.getpid()}\n")
        if not s.state_dir:  # the journal's home: per address, outliving runs (port 0: per run)
            own = os.path.expanduser(f"~/.local/state/orchd/{s.host}-{s.port}")
            s.state_dir = own if fixed_port else os.path.join(run_dir, "state")
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        rt = Runtime(run_dir=run_dir, tag=tag, scheduler_addr=f"ipc://{run_dir}/scheduler.sock")
        for ri in range(len(cfg.replicas)):
            for fi in range(s.frontends):
                name = rt.ring_name(ri, fi)
                create_ring(name, lim.ring_bytes)
                self.rings.append(name)
        for fi in range(s.frontends):
            create_bell(rt.bell_path(fi))
        res = Resolved(cfg, rt)
        cfg_path = os.path.join(run_dir, "config.json")
        write_resolved(res, cfg_path)
        py = sys.executable
        env = child_env({})
        self._add(LEADER, [py, "-m", "orchd.scheduler.loop", cfg_path], env)
        for ri, rep in enumerate(cfg.replicas):
            sup_env = child_env({"CUDA_VISIBLE_DEVICES": rep.devices})
            self._add(
                peers.supervisor(rep.id),
                [py, "-m", "engine_procs.supervisor", cfg_path, str(ri)],
                sup_env,
            )
        for fi in range(s.frontends):
            self._add(peers.frontend(fi), [py, "-m", "orchd.frontend.main", cfg_path, str(fi)], env)
        self.group = self.restart_group(time.monotonic())
        return res

    def restart_group(self, now: float) -> RestartGroup:
        """The restart rule over the children added so far, every one due at ``now``."""
        s = self.cfg.server
        base_s, cap_s = s.restart_backoff_ms / 1000.0, s.restart_backoff_max_ms / 1000.0
        return RestartGroup(list(self.children), LEADER, lambda: RestartPolicy(base_s, cap_s), now)

    def _add(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        name = str(name)  # a plain str: it goes into wire messages (PeerDown)
        self.children[name] = Child(name, argv, env)

    def _spawn(self, c: Child, group: RestartGroup, now: float) -> None:
        try:
            c.proc = subprocess.Popen(
                c.argv, env=c.env, start_new_session=True, preexec_fn=die_with_parent
            )
        except (OSError, subprocess.SubprocessError) as e:
            group.start_failed(c.name, now)
            log.error("child failed to start", child=c.name, error=str(e), **_retry(group, c, now))
            return
        group.started(c.name, now)
        self.watchdog.started(c.name, now)
        log.info("started child", child=c.name, pid=c.proc.pid)

    # ---------------------------------------------------------------- running

    def run(self) -> int:
        res = self.prepare()
        s = self.cfg.server
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"launcher")
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(res.runtime.scheduler_addr)
        sock.send(p.encode(p.Hello("launcher", "launcher", os.getpid())))

        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(rfd, zmq.POLLIN)

        self._restart_due()  # a new group has every child due: the scheduler first
        try:
            while not self.stopping:
                events = dict(poller.poll(self._next_timeout_ms()))
                if rfd in events:
                    with contextlib.suppress(BlockingIOError):
                        os.read(rfd, 4096)
                if sock in events:
                    self._on_message(sock, res)
                self._watch()
                self._reap(sock)
                self._restart_due()
            self._drain(sock, poller)
        finally:
            self._shutdown()
            sock.close(0)
            ctx.term()
            signal.set_wakeup_fd(-1)
            os.close(rfd)
            os.close(wfd)
        if self.forced:
            log.warning("forced exit: children killed; rings and sockets removed", port=s.port)
            return 130
        log.info("stopped; every process, ring and socket is gone", port=s.port)
        return 0

    def _on_stop(self, signum: int, frame: object) -> None:
        if self.stopping:
            if signum == signal.SIGINT:
                self.forced = True
            return
        self.stopping = True
        if signum == signal.SIGINT:
            with contextlib.suppress(OSError):  # said plainly, whatever the log format
                os.write(2, b"orchd: draining; press Ctrl-C again to exit now\n")

    def _next_timeout_ms(self) -> int:
        due = self.group.next_due() if self.group is not None else None
        if due is None:
            return int(WATCH_S * 1000)
        return max(0, min(int(WATCH_S * 1000), int((due - time.monotonic()) * 1000)))

    def _on_message(self, sock: zmq.Socket[bytes], res: Resolved) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            for frame in frames:
                self._on_notice(p.decode(frame), res, sock)

    def _on_notice(self, msg: p.Message, res: Resolved, sock: zmq.Socket[bytes]) -> None:
        if isinstance(msg, p.PeersSeen):
            self.watchdog.report(msg.ages_ms, time.monotonic())
            return
        if isinstance(msg, p.Rehello):  # a scheduler that does not know us (a new one)
            sock.send(p.encode(p.Hello("launcher", "launcher", os.getpid())))
            return
        if not isinstance(msg, p.ClusterReady):
            return
        s = self.cfg.server
        host = f"[{s.host}]" if ":" in s.host else s.host
        log.info(
            "ready",
            url=f"http://{host}:{s.port}",
            frontends=msg.frontends,
            replicas=msg.replicas,
            run_dir=res.runtime.run_dir,
        )
        if not s.api_keys:
            log.warning(
                "no API keys configured: accepting the development key 'dev' "
                "(loopback only); set ORCHD_API_KEYS for anything else"
            )

    def _watch(self) -> None:
        """Kill every child alive but silent past the watchdog limit (reaped, restarted)."""
        for late in self.watchdog.overdue(time.monotonic()):
            c = self.children[late.name]
            self.watchdog.exited(late.name)
            if c.proc is None or c.proc.poll() is not None:
                continue
            log.error(
                "child is alive but silent; killing it",
                child=c.name,
                pid=c.proc.pid,
                silent_s=round(late.silent_s, 1),
                limit_ms=self.cfg.server.watchdog_ms,
            )
            self.killed[c.name] = late.reason
            with contextlib.suppress(ProcessLookupError):
                c.proc.kill()

    def _reap(self, sock: zmq.Socket[bytes]) -> None:
        assert self.group is not None
        now = time.monotonic()
        for c in self.children.values():  # the scheduler first
            if c.proc is None or c.proc.poll() is None:
                continue
            code = c.proc.returncode
            c.proc = None
            stop = self.group.exited(c.name, now)
            self.watchdog.exited(c.name)
            why = self.killed.pop(c.name, f"process exited with status {code}")
            log.error(
                "child died", child=c.name, status=code, why=why, **_retry(self.group, c, now)
            )
            if c.name != LEADER:
                with contextlib.suppress(zmq.ZMQError):
                    sock.send(p.encode(p.PeerDown(c.name, why)))
            for name in stop:  # the scheduler died: the others restart with it
                self.watchdog.exited(name)
                self._stop_child(self.children[name], signal.SIGKILL, 2.0)

    def _restart_due(self) -> None:
        assert self.group is not None
        now = time.monotonic()
        for name in self.group.due(now):
            self._spawn(self.children[name], self.group, now)

    # ---------------------------------------------------------------- stopping

    def _drain(self, sock: zmq.Socket[bytes], poller: zmq.Poller) -> None:
        deadline_ms = self.cfg.server.drain_deadline_ms
        log.info("draining: no new tasks; running streams may finish", deadline_ms=deadline_ms)
        with contextlib.suppress(zmq.ZMQError):
            sock.send(p.encode(p.DrainAll(1, deadline_ms)))
        end = time.monotonic() + deadline_ms / 1000.0 + 5.0
        while time.monotonic() < end:
            if self.children[LEADER].proc is None or self.forced:
                return
            events = dict(poller.poll(200))
            if sock in events:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                if any(isinstance(p.decode(f), p.Done) for f in frames):
                    return

    def _stop_child(self, c: Child, sig: int | None, wait_s: float) -> None:
        """Signal ``c`` and wait up to ``wait_s`` for it, then kill it (at once once forced)."""
        if c.proc is None:
            return
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(sig)
        end = time.monotonic() + wait_s
        while not self.forced and time.monotonic() < end:
            try:
                c.proc.wait(min(0.1, max(0.0, end - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                continue
        if c.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.kill()
            c.proc.wait()
        c.proc = None

    def _shutdown(self) -> None:
        groups = [
            [c for n, c in self.children.items() if Peer(n).role == "frontend"],
            [c for n, c in self.children.items() if Peer(n).role == "supervisor"],
            [self.children[LEADER]],
        ]
        for group in groups:
            for c in group:
                if c.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        c.proc.send_signal(signal.SIGTERM)
            for c in group:
                self._stop_child(c, None, 8.0)
        for name in self.rings:
            unlink_ring(name)
        if self.guard is not None:
            self.guard.close()
        if self.made_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            for f in os.listdir(self.run_dir):
                if f.endswith((".sock", ".bell", ".json")) or f == PID_FILE:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.run_dir, f))


def _retry(group: RestartGroup, c: Child, now: float) -> dict[str, object]:
    """Log fields: when ``c`` is restarted, and whether its circuit breaker is open."""
    state = group.children[c.name]
    at = state.restart_at if state.restart_at is not None else now
    fields: dict[str, object] = {"restart_in_s": round(at - now, 3)}
    if state.policy.open:
        fields["circuit_open_after_failures"] = state.policy.failures
    return fields


_RING = re.compile(r"^orchd-(\d+)-[0-9a-f]{6}-r\d+-f\d+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def reclaim_stale_rings(shm_dir: str = "/dev/shm") -> list[str]:
    """Remove rings left by an orchd that was killed with -9 (its launcher pid is gone)."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = _RING.match(name)
        if m is None:
            continue
        if _alive(int(m.group(1))):
            continue  # its orchd still runs
        if unlink_ring("/" + name):
            removed.append(name)
    if removed:
        log.info("removed rings of orchd instances that are gone", rings=len(removed))
    return removed


def _orchd_alive(pid: int) -> bool:
    """``pid`` runs, and is an ``orchd serve`` (a pid reused by another program is not)."""
    if not _alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return True  # no /proc to ask: trust the pid
    named = any(a == b"orchd.cli" or os.path.basename(a) == b"orchd" for a in args)
    return named and b"serve" in args


def _run_dir_owner(run_dir: str) -> int | None:
    """The pid of the launcher that made ``run_dir`` (None: no readable pid file)."""
    try:
        with open(os.path.join(run_dir, PID_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def reclaim_stale_run_dirs(tmp_dir: str) -> list[str]:
    """Remove run directories that orchd made under ``tmp_dir`` for a launcher that is gone
    (killed with -9: it could not remove its own)."""
    removed: list[str] = []
    try:
        names = os.listdir(tmp_dir)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(tmp_dir, name)
        if not name.startswith(RUN_DIR_PREFIX) or not os.path.isdir(path):
            continue
        pid = _run_dir_owner(path)
        if pid is None or pid == os.getpid() or _orchd_alive(pid):
            continue  # not ours to judge, or its orchd still runs
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed run directories of orchd instances that are gone", dirs=removed)
    return removed


def reclaim_run_dir(run_dir: str) -> None:
    """A configured run_dir: refuse one a live orchd uses; clear what a dead one left (its
    sockets, bells, config and pid file; anything else, such as state, stays)."""
    pid = _run_dir_owner(run_dir)
    if pid is None or pid == os.getpid():
        return
    if _orchd_alive(pid):
        raise ConfigError(f"server.run_dir {run_dir} is in use by the orchd launcher pid {pid}")
    for f in os.listdir(run_dir):
        if f.endswith((".sock", ".bell", ".json")) or f == PID_FILE:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(run_dir, f))
    log.info("cleared a run directory left by an orchd that is gone", run_dir=run_dir, pid=pid)


def serve(cfg: Config) -> int:
    log.setup("launcher", cfg.server.log_level, cfg.server.log_format)
    return Launcher(expand_gpus(cfg)).run()
