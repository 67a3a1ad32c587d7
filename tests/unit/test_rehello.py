"""A supervisor asked to introduce itself again (``Rehello``: the scheduler took it as dead,
or the scheduler is new) re-announces its replica's whole state; event by event."""

from __future__ import annotations

import msgspec

from engine_procs.supervisor_core import SupervisorCore
from engine_procs.supervisor_effects import Send, StartEngine
from ipc import protocol as p
from orchd.config import Config, Replica

T0 = 100.0


def core(**replica: object) -> SupervisorCore:
    rep = msgspec.convert({"id": "r0", "slots": 6, **replica}, Replica)
    c = SupervisorCore(Config(), rep, now=T0, random_seed=lambda: 42)
    c.start()
    assert c.take() == [StartEngine(0, 0.0)]
    return c


def statuses(c: SupervisorCore) -> list[p.ReplicaStatus]:
    return [e.msg for e in c.take() if isinstance(e, Send) and isinstance(e.msg, p.ReplicaStatus)]


def test_a_ready_replica_re_announces_ready_with_its_model_version_and_slots() -> None:
    c = core()
    c.engine_ready(0, "mock-1.0", T0)
    c.take()
    c.on_message(p.Rehello(), T0 + 20)
    assert statuses(c) == [
        p.ReplicaStatus(
            "r0", True, "mock", "mock-1.0", "", model_ref="mock:tiny", slots=6, start_failures=0
        )
    ]


def test_a_replica_that_cannot_load_re_announces_why_and_its_failures() -> None:
    c = core()
    c.engine_start_failed(0, "cannot load model", T0)
    c.take()
    c.engine_start_failed(0, "cannot load model", T0 + 1)
    c.take()
    c.on_message(p.Rehello(), T0 + 2)
    (st,) = statuses(c)
    assert not st.ready and st.start_failures == 2 and not st.circuit_open
    assert st.last_error == "engine failed to start: cannot load model"


def test_the_wire_keeps_older_replica_status_readable() -> None:
    """The appended fields have defaults: a status without them still decodes."""
    old = p.encode(p.ReplicaStatus("r0", True, "mock", "mock-1.0"))
    assert p.decode(old) == p.ReplicaStatus("r0", True, "mock", "mock-1.0")
    assert isinstance(p.decode(p.encode(p.Rehello())), p.Rehello)
    seen = p.PeersSeen({"fe0": 12, "sup-r0": 3})
    assert p.decode(p.encode(seen)) == seen
