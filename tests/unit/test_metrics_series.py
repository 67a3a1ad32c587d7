"""The labelled series the scheduler core records (orchd/core/series.py), event by event with
explicit time, and how the shell renders them: label budgets, first token from arrival,
inter-token time per record, outcomes, and an exposition promtool can parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipc import protocol as p
from orchd.core.series import BUDGETS, OTHER, SECONDS_BUCKETS, Hist, LabelBudget, outcome
from orchd.scheduler.metrics import SchedulerMetrics
from orchd.scheduler.procs import read_proc
from tests.support.wait import wait_for
from tests.unit.test_scheduler_core import FE, ended, make_core, submit
from tests.unit.test_supervisor_core import dispatch
from tests.unit.test_supervisor_core import make_core as make_supervisor

ROOT = Path(__file__).resolve().parents[2]


def samples(core: object) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = SchedulerMetrics(core).render().decode()  # type: ignore[arg-type]
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def lab(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


def test_a_label_past_its_budget_folds_into_other() -> None:
    b = LabelBudget()
    kept = [b.fold("engine", f"e{i}") for i in range(BUDGETS["engine"])]
    assert kept == ["e0", "e1", "e2", "e3"]
    assert b.fold("engine", "e4") == OTHER and b.fold("engine", "e99") == OTHER
    assert b.fold("engine", "e2") == "e2"  # a value already kept stays itself
    assert [b.fold("reason", f"r{i}") for i in range(17)][-1] == OTHER  # reason: 16
    assert b.fold("replica_id", "r0") == "r0"
    assert b.fold("engine_version", "x" * 50) == "x" * 50  # no budget: passes through


def test_budgets_are_the_ones_the_lint_file_states() -> None:
    lint = json.loads((ROOT / "contracts" / "metrics.lint.json").read_text())
    assert lint["cardinality_budgets"] == BUDGETS
    assert lint["fold_value"] == OTHER
    for k, v in {
        "engine": 4,
        "priority": 8,
        "reason": 16,
        "pool_id": 256,
        "replica_id": 1024,
    }.items():
        assert BUDGETS[k] == v


def test_client_chosen_values_cannot_grow_the_series() -> None:
    core = make_core()
    for i in range(10):  # ten unknown engines: refused, each a rejected series at most 4 wide
        submit(core, f"x{i}", engine=f"bogus{i}")
    got = samples(core)
    engines = {dict(k[1])["engine"] for k in got if k[0] == "tasks_rejected_total"}
    # "mock" (configured) keeps its place in the budget: three bogus names, then "other"
    assert engines == {"bogus0", "bogus1", "bogus2", OTHER}
    assert got[("tasks_rejected_total", lab(engine=OTHER, reason="INVALID_PARAMS"))] == 7
    submit(core, "m1", 0)
    assert samples(core)[("tasks_enqueued_total", lab(
        engine="mock", engine_version="mock-1.0", pool_id="default", replica_id="none",
        priority="interactive"))] == 1  # fmt: skip
    for i in range(20):  # twenty cancel reasons: 16 kept, the rest are "other"
        submit(core, f"c{i}", 0)
        core.cancel(FE, p.Cancel(0, f"c{i}", reason=f"why{i}"), 1)
    # one budget per label name: the rejection's INVALID_PARAMS and 15 cancel reasons
    named = ("tasks_canceled_total", "tasks_rejected_total")
    reasons = {dict(k[1])["reason"] for k in samples(core) if k[0] in named}
    assert len(reasons) == BUDGETS["reason"] + 1 and OTHER in reasons


def test_lint_series_carry_their_labels() -> None:
    core = make_core(queue_capacity=1)
    for i in range(1, 6):
        submit(core, f"t{i}", 10)  # four run, one waits
    ended(core, "t1", 110, tokens_out=5, tokens_in=3, first_token_ms=20.0, decode_ms=90.0)
    got = samples(core)
    where = dict(engine="mock", engine_version="mock-1.0", pool_id="default")
    assert (
        got[("tasks_enqueued_total", lab(**where, replica_id="none", priority="interactive"))] == 5
    )
    started = sum(v for (n, _), v in got.items() if n == "tasks_started_total")
    assert started == 5  # t5 took t1's slot
    t1_replica = "r0"
    assert got[("tokens_in_total", lab(**where, replica_id=t1_replica))] == 3
    assert got[("tokens_out_total", lab(**where, replica_id=t1_replica))] == 5
    # From arrival: 0 ms queued (dispatched at once), then 20 ms to the first token.
    hist = lab(**where, priority="interactive")
    assert got[("latency_first_token_ms_sum", hist)] == 20.0
    assert got[("latency_decode_ms_sum", hist)] == 90.0
    assert (
        got[("placement_decisions_total", lab(outcome="placed", pinned="false", fallback="false"))]
        == 5
    )
    assert got[("placement_candidates_considered", lab())] >= 1
    assert got[("queue_depth", lab(**where, priority="interactive"))] == 0
    assert got[("queue_depth", lab(**where, priority="batch"))] == 0


def test_first_token_is_measured_from_arrival_not_dispatch() -> None:
    core = make_core(queue_capacity=4)
    for i in range(1, 6):
        submit(core, f"t{i}", 0)  # t5 waits for a slot
    ended(core, "t1", 400, tokens_out=2, first_token_ms=10.0, decode_ms=50.0)  # t5 starts at 400
    ended(core, "t5", 500, tokens_out=2, first_token_ms=30.0, decode_ms=100.0)
    got = samples(core)
    native = lab(model="mock:tiny", pool="default")
    assert got[("orchd_queue_time_seconds_sum", native)] == pytest.approx(0.4)
    # t1: 0 + 10 ms; t5: 400 ms queued + 30 ms
    assert got[("orchd_time_to_first_token_seconds_sum", native)] == pytest.approx(0.44)
    assert got[("orchd_time_to_first_token_seconds_count", native)] == 2
    assert got[("orchd_e2e_request_seconds_sum", native)] == pytest.approx(0.4 + 0.5)
    assert got[("orchd_requests_total", lab(model="mock:tiny", pool="default", outcome="ok"))] == 2
    assert (
        got[("placement_decisions_total", lab(outcome="queued", pinned="false", fallback="false"))]
        == 1
    )
    assert got[("orchd_request_generation_tokens_count", native)] == 2
    assert got[("orchd_replicas_ready", lab(pool="default"))] == 2


def test_outcomes() -> None:
    assert outcome("stop", "") == "ok" and outcome("length", "") == "ok"
    assert outcome("budget", "") == "ok"
    assert outcome("canceled", "") == "canceled"
    assert outcome("error", "WORKER_RESET") == "error"
    assert outcome("error", "QUEUE_FULL_DROP_LRU") == "rejected"


def test_inter_token_time_is_observed_once_per_record() -> None:
    sup = make_supervisor()
    dispatch(sup, "t1", 100.0)
    rid = next(iter(sup.by_rid))
    sup.tokens(rid, [b'"a"'], 100.010)  # the first record: no gap yet
    sup.tokens(rid, [b'"b"', b'"c"'], 100.030)  # 20 ms for two tokens: one 10 ms observation
    sup.tokens(rid, [b'"d"'], 100.035)  # 5 ms
    sup.finish(rid, "stop", 100.040)
    (ended_msg,) = [
        e.msg for e in sup.take() if hasattr(e, "msg") and isinstance(e.msg, p.TaskEnded)
    ]
    assert sum(ended_msg.gap_counts) == 2
    assert ended_msg.gap_sum_s == pytest.approx(0.015)
    assert len(ended_msg.gap_counts) == len(SECONDS_BUCKETS) + 1
    # the scheduler merges them into orchd_inter_token_seconds
    core = make_core()
    submit(core, "t1", 0)
    ended(core, "t1", 50, tokens_out=4, gap_counts=ended_msg.gap_counts, gap_sum_s=0.015)
    got = samples(core)
    native = lab(model="mock:tiny", pool="default")
    assert got[("orchd_inter_token_seconds_count", native)] == 2
    assert got[("orchd_inter_token_seconds_bucket", native | {("le", "0.01")})] == 2


def test_hist_merge_ignores_other_bounds() -> None:
    h = Hist((1.0, 2.0))
    h.observe(1.0)
    h.observe(5.0)
    assert h.counts == [1, 0, 1] and h.count == 2 and h.total == 6.0
    h.merge([1, 1, 1], 10.0)
    assert h.counts == [2, 1, 2] and h.count == 5
    h.merge([1, 1], 3.0)  # another build's bounds: dropped, not misfiled
    assert h.count == 5


def test_engine_restarts_counted_when_a_ready_replica_fails() -> None:
    core = make_core()
    core.replica_status("sup-r0", p.ReplicaStatus("r0", False, "mock", "mock-1.0", "died"), 5)
    core.replica_status("sup-r0", p.ReplicaStatus("r0", False, "mock", "mock-1.0", "died"), 6)
    got = samples(core)
    assert got[("orchd_engine_restarts_total", lab(pool="default", replica="r0"))] == 1
    assert got[("orchd_replicas_ready", lab(pool="default"))] == 1


def test_process_figures_come_from_proc() -> None:
    me = read_proc(os.getpid())
    assert me is not None
    assert me.cpu_s > 0 and me.rss_bytes > 10 * 2**20 and me.open_fds >= 3
    with open(os.devnull) as extra:
        assert extra.fileno() >= 0
        again = read_proc(os.getpid())
        assert again is not None and again.open_fds == me.open_fds + 1
    # A command name with spaces and parentheses does not shift stat's fields.
    child = subprocess.Popen(
        [sys.executable, "-c", "open('/proc/self/comm', 'w').write('a) b (c');"
         "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: Path(f"/proc/{child.pid}/comm").read_text() == "a) b (c\n", 10, "comm")
        got = read_proc(child.pid)
        assert got is not None and 0 <= got.cpu_s < 60 and got.rss_bytes > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
    assert read_proc(child.pid) is None  # gone: skipped, not an error


def test_processes_are_labelled_by_role_and_instance_and_restarts_counted() -> None:
    core = make_core()
    m = SchedulerMetrics(core)
    m.joined("launcher", p.Hello("launcher", "launcher", os.getppid()))
    m.joined("fe1", p.Hello("frontend", "fe1", os.getpid()))
    m.joined("sup-r0", p.Hello("supervisor", "sup-r0", os.getpid(), replica_id="r0"))
    m.joined("sup-r0", p.Hello("supervisor", "sup-r0", os.getpid(), replica_id="r0"))  # again
    text = m.render().decode()
    got = {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    instances = {dict(ls)["instance"] for n, ls in got if n == "orchd_process_open_fds"}
    assert instances == {"scheduler", "launcher", "frontend-1", "supervisor-r0"}
    assert got[("orchd_engine_restarts_total", lab(pool="default", replica="r0"))] == 1
    m.native.frontend_stats(p.FrontendStats(1, 3, 4, 5))
    m.native.frontend_stats(p.FrontendStats(0, 0, 0, 0))
    m.left("fe0", 0)
    got = samples(core) | {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(m.render().decode())
        for s in fam.samples
    }
    assert got[("frontend_streams_open", lab(frontend="1"))] == 3
    assert got[("frontend_client_disconnects_total", lab(frontend="1"))] == 4
    assert ("frontend_streams_open", lab(frontend="0")) not in got  # it left
