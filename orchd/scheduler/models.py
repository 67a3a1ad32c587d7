"""``file:`` model refs on the scheduler's disk: confined to the model roots, and verified off
the loop within bounds.

A ``file:`` ref (or a bare absolute path) names a path under one of ``catalog.model_roots``
(default ``<run_dir>/models``) once every symlink is resolved; a relative path is looked up
under each root in turn: a link out of a root is refused, and so
is anything but a regular file or a directory (devices, FIFOs, sockets, ``/proc``). Messages
name the ref the client gave, never the path it resolved to.

A verification reads at most ``verify_max_bytes`` for at most ``verify_timeout_ms``, can be
canceled (its model deleted, the scheduler stopping), and at most ``verify_concurrency`` run
at once; the next is refused with 429 until one ends.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from orchd.config import Catalog
from orchd.core.errors import Code, OrchdError
from orchd.core.refs import parse, unreachable

BLOCK = 1 << 20


def model_roots(cfg: Catalog, run_dir: str) -> list[str]:
    return [os.path.realpath(r) for r in cfg.model_roots or [os.path.join(run_dir, "models")]]


def _refused(ref: str, why: str) -> OrchdError:
    return OrchdError(Code.INVALID_PARAMS, f"model ref {ref!r} {why}")


def confine(ref: str, roots: list[str], *, regular_only: bool = False) -> str:
    """The real path a ``file:`` ref names, if it lies under a root and is a regular file (or
    a directory, unless ``regular_only``); else INVALID_PARAMS naming ``ref``."""
    r = parse(ref)
    if r.scheme == "relative":
        found = [os.path.join(root, r.path) for root in roots]
        rest = next((f for f in found if os.path.lexists(f)), found[0] if found else r.path)
    elif r.scheme == "file":
        rest = r.path
    else:
        raise _refused(ref, "is not a file: ref")
    real = os.path.realpath(rest)
    if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots):
        raise _refused(ref, "is outside the model roots (catalog.model_roots)")
    try:
        st = os.stat(real)
    except OSError as e:
        raise _refused(ref, f"cannot be read: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode) or (stat.S_ISDIR(st.st_mode) and not regular_only):
        return real
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    raise _refused(ref, f"is {kind}: only model files can be verified" if regular_only else
                   f"is {kind} (a device, FIFO or socket is never a model)")  # fmt: skip


def check_refs(
    op: str, args: dict[str, object], roots: list[str], resolve: Callable[[str], str]
) -> None:
    """The catalog and reload ops that take a ref: a local one must be confined (a reload
    names a ref or a catalog id: ``resolve`` gives the ref an id stands for). A relative
    path becomes the ``file:`` ref of what it names under the roots, so that every process
    reads the same file."""
    names = {"catalog.create": ("source_url", "ref"), "pool.reload": ("new_model_ref",)}
    for name in names.get(op, ()):
        ref = args.get(name)
        if not isinstance(ref, str):
            continue
        target = resolve(ref) if op == "pool.reload" else ref
        try:
            scheme = parse(target).scheme
        except OrchdError:
            continue  # malformed: the op itself refuses it, in its own terms (400 or 409)
        if scheme not in ("file", "relative"):
            continue
        if scheme == "relative" and not _under_a_root(target, roots):
            continue  # nothing there yet: confined by its form (no '..'); read when verified
        try:
            real = confine(target, roots)
        except OrchdError as e:
            raise _refused(ref, e.message.removeprefix(f"model ref {target!r} ")) from None
        if scheme == "relative" and target == ref:
            args[name] = "file:" + real


def _under_a_root(rel: str, roots: list[str]) -> bool:
    return any(os.path.lexists(os.path.join(root, rel)) for root in roots)


@dataclass(slots=True)
class Job:
    model_id: str
    ref: str
    algo: str = "sha256"  # of the digest it is checked against
    cancel: threading.Event = field(default_factory=threading.Event)


class Verifier:
    """Digests computed off the loop, each on its own thread; results collected on the tick."""

    def __init__(self, cfg: Catalog, roots: list[str]) -> None:
        self.max_bytes = cfg.verify_max_bytes
        self.timeout_s = cfg.verify_timeout_ms / 1000.0
        self.concurrency = cfg.verify_concurrency
        self.roots = roots
        self.jobs: dict[str, Job] = {}  # model id -> its running verification
        self.results: queue.SimpleQueue[tuple[Job, str | None, str]] = queue.SimpleQueue()

    def check_room(self, model_id: str) -> None:
        """429 if ``concurrency`` verifications of other models are running."""
        others = [m for m in self.jobs if m != model_id]
        if len(others) >= self.concurrency:
            raise OrchdError(
                Code.ADMISSION_REJECT,
                f"{len(others)} model verifications are running (catalog.verify_concurrency); "
                "retry when one ends",
                retry_after_ms=5000,
                policy_label="verify_concurrency",
            )

    def start(self, model_id: str, ref: str, algo: str = "sha256") -> None:
        self.cancel(model_id)  # a newer request replaces a running one
        job = Job(model_id, ref, algo)
        self.jobs[model_id] = job
        threading.Thread(target=self._run, args=(job,), daemon=True).start()

    def cancel(self, model_id: str) -> None:
        job = self.jobs.pop(model_id, None)
        if job is not None:
            job.cancel.set()

    def stop(self) -> None:
        for model_id in list(self.jobs):
            self.cancel(model_id)

    def _run(self, job: Job) -> None:
        try:
            self.results.put((job, self.digest(job), ""))
        except OrchdError as e:
            self.results.put((job, None, e.message))

    def digest(self, job: Job) -> str:
        ref = job.ref
        if not ref:
            raise OrchdError(Code.INVALID_PARAMS, "the model has no source_url to verify")
        r = parse(ref)
        if r.remote:
            raise unreachable(ref, "this scheduler fetches no remote model to verify it")
        if r.scheme not in ("file", "relative"):
            raise OrchdError(Code.INVALID_PARAMS, f"{r.scheme}: refs have no bytes to verify")
        real = confine(ref, self.roots, regular_only=True)
        deadline = time.monotonic() + self.timeout_s
        try:
            # O_NONBLOCK: a FIFO swapped in after the check cannot hang the open.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise _refused(ref, f"cannot be read: {e.strerror}") from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _refused(ref, "is not a regular file")
            try:
                h = hashlib.new(job.algo)
            except ValueError:
                raise OrchdError(
                    Code.INVALID_PARAMS, f"digest algorithm {job.algo!r} is not one orchd computes"
                ) from None
            total = 0
            while block := f.read(BLOCK):
                total += len(block)
                if total > self.max_bytes:
                    raise _refused(ref, f"is larger than catalog.verify_max_bytes={self.max_bytes}")
                if job.cancel.is_set():
                    raise OrchdError(Code.INVALID_PARAMS, f"verification of {ref!r} was canceled")
                if time.monotonic() > deadline:
                    raise OrchdError(
                        Code.INVALID_PARAMS,
                        f"verification of {ref!r} took longer than catalog.verify_timeout_ms="
                        f"{int(self.timeout_s * 1000)}",
                    )
                h.update(block)
        return f"{job.algo}:{h.hexdigest()}"

    def done(self) -> list[tuple[str, str | None, str]]:
        """Finished verifications: (model id, digest or None, error). A canceled one is not
        reported (its model is gone, or a newer verification replaced it)."""
        out: list[tuple[str, str | None, str]] = []
        while True:
            try:
                job, digest, error = self.results.get_nowait()
            except queue.Empty:
                return out
            if self.jobs.get(job.model_id) is job:
                del self.jobs[job.model_id]
                out.append((job.model_id, digest, error))
