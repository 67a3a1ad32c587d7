"""deploy/prometheus and deploy/grafana against a real Prometheus scraping a live orchd.

One Prometheus (Debian's package) runs the shipped scrape config and alert rules (1 s
intervals, ``for: 1s``; tests/support/prometheus.py) against one orchd with two pools and
two (fake NVML) GPUs under background traffic. The tests run in file order on that one
stack: an engine dies (alerts fire and resolve for real), every dashboard query returns data
(the engine-restart panel's series exists once an engine has restarted), every rule
evaluates, the traffic's refusals fire their alert, and the last test stops orchd to see the
scrape-down alert."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support import dashboard as dash
from tests.support.daemon import Daemon
from tests.support.prometheus import Prometheus
from tests.support.traffic import Traffic
from tests.support.wait import wait_for

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "orchd-dashboard.json"
SCRAPE_S = 1.0  # tests/support/prometheus.py TEST_INTERVAL
DATA_TIMEOUT_S = 30.0  # traffic start to every panel having data
ALERT_TIMEOUT_S = 20.0  # a condition to its alert firing (or resolving): scrape + 2 evaluations
RESTART_BACKOFF_MS = 5000  # an engine that dies young stays down this long (then 2x)
CONFIG = f"""
[server]
restart_backoff_ms = {RESTART_BACKOFF_MS}

[[replicas]]
id = "r0"
pool_id = "default"
devices = "0"
slots = 16
[replicas.mock]
ttft_ms = 5
itl_ms = 5

[[replicas]]
id = "r1"
pool_id = "spare"
devices = "1"
slots = 16
[replicas.mock]
ttft_ms = 5
itl_ms = 5
"""


@dataclass
class Stack:
    orchd: Daemon
    prom: Prometheus
    traffic: Traffic
    started: float  # wall clock, as Prometheus's API takes it


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"ORCHD_NVML_MODULE": "tests.fakes.nvml"}  # two GPUs where there are none
    with Daemon(tmp_path_factory.mktemp("orchd"), CONFIG, env=env) as d:
        target = f"127.0.0.1:{d.port}"
        with Prometheus(tmp_path_factory.mktemp("prometheus"), target) as prom:
            started = time.time()
            with Traffic(d) as traffic:
                yield Stack(d, prom, traffic, started)
            assert not traffic.failures, traffic.failures[:5]


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(v)) for s in result for _, v in s["values"])


def firing(prom: Prometheus, name: str, **labels: str) -> list[dict[str, Any]]:
    return [
        a
        for a in prom.alerts(name)
        if a["state"] == "firing" and all(a["labels"].get(k) == v for k, v in labels.items())
    ]


def engine_of(d: Daemon, replica_index: str) -> psutil.Process:
    sup = d.find("engine_procs.supervisor", replica_index)
    (engine,) = [c for c in sup.children() if "engine_procs.mock_engine" in c.cmdline()]
    return engine


def pool_ready(d: Daemon, pool: str) -> bool:
    text = httpx.get(f"{d.base}/metrics", timeout=10).text
    return f'orchd_replicas_ready{{pool="{pool}"}} 1.0' in text.splitlines()


def test_engine_death_fires_no_ready_replica_and_restart_alerts(stack: Stack) -> None:
    """Pool default's only engine dies twice in a row (SIGKILL): its supervisor reports the
    replica not ready and counts each restart; an engine that dies within
    orchd.core.restart.STABLE_AFTER_S of becoming ready restarts only after the backoff
    (RESTART_BACKOFF_MS, doubling), so the second death keeps the pool without a ready
    replica for seconds whatever the first did (a death after a stable run restarts at once).
    OrchdNoReadyReplica fires for that pool (not for pool spare, which serves on) and
    resolves on its own; OrchdEngineRestarts fires for the replica."""
    d, prom = stack.orchd, stack.prom
    wait_for(
        lambda: prom.query('orchd_replicas_ready{pool="default"} == 1'),
        ALERT_TIMEOUT_S,
        "Prometheus to see pool default ready",
    )
    assert not prom.alerts("OrchdNoReadyReplica")
    assert not prom.alerts("OrchdEngineRestarts")
    first = engine_of(d, "0")
    first.kill()
    wait_for(lambda: not pool_ready(d, "default"), 10, "orchd to see the engine gone")
    wait_for(lambda: pool_ready(d, "default"), 3 * RESTART_BACKOFF_MS / 1000, "engine back")
    # Prometheus has seen it back too (an alert the first death fired has resolved), so what
    # follows is the second death's alone.
    wait_for(
        lambda: (
            not prom.alerts("OrchdNoReadyReplica")
            and prom.query('orchd_replicas_ready{pool="default"} == 1')
        ),
        ALERT_TIMEOUT_S,
        "Prometheus to see pool default back",
    )
    second = engine_of(d, "0")
    assert second.pid != first.pid
    second.kill()  # within STABLE_AFTER_S of its start: the next start waits the backoff
    try:
        wait_for(
            lambda: firing(prom, "OrchdNoReadyReplica", pool="default"),
            ALERT_TIMEOUT_S,
            "OrchdNoReadyReplica to fire for pool default",
        )
    except TimeoutError:
        seen = prom.query_range("orchd_replicas_ready", time.time() - 30, time.time(), 1)
        pytest.fail(f"no alert; alerts {prom.api('alerts')}; orchd_replicas_ready: {seen}")
    (alert,) = prom.alerts("OrchdNoReadyReplica")  # pool spare still serves
    assert alert["labels"]["severity"] == "critical"
    assert "readyz" in alert["annotations"]["runbook"]
    wait_for(
        lambda: not prom.alerts("OrchdNoReadyReplica"),
        2 * RESTART_BACKOFF_MS / 1000 + ALERT_TIMEOUT_S,
        "OrchdNoReadyReplica to resolve once the engine is back",
    )
    assert engine_of(d, "0").pid not in (first.pid, second.pid)
    wait_for(
        lambda: firing(prom, "OrchdEngineRestarts", pool="default", replica="r0"),
        ALERT_TIMEOUT_S,
        "OrchdEngineRestarts to fire for r0",
    )
    assert not firing(prom, "OrchdEngineRestarts", replica="r1")


def test_every_dashboard_panel_returns_data(stack: Stack) -> None:
    board = json.loads(DASHBOARD.read_text())
    targets = dash.targets(board)
    assert len(targets) >= 20
    prom = stack.prom
    step = SCRAPE_S
    rate_interval = dash.rate_interval(SCRAPE_S, step)
    values: dict[str, str] = {}

    def variables_resolve() -> bool:
        for name, match, label in dash.query_variables(board):
            found = prom.label_values(label, dash.substitute(match, values, rate_interval))
            if not found:
                return False
            values[name] = dash.regex_of(found)
        return True

    wait_for(variables_resolve, DATA_TIMEOUT_S, "every dashboard variable to have values")
    assert set(values) == {"instance", "pool", "model"}

    empty: list[str] = []

    def all_have_data() -> bool:
        empty.clear()
        end = time.time()
        for t in targets:
            expr = dash.substitute(t.expr, values, rate_interval)
            if not finite(prom.query_range(expr, stack.started, end, step)):
                empty.append(f"{t.panel} [{t.ref_id}]: {expr}")
        return not empty

    try:
        wait_for(all_have_data, DATA_TIMEOUT_S, "every dashboard query to return data")
    except TimeoutError:
        pytest.fail("dashboard queries with no data:\n" + "\n".join(empty))
    # Per GPU: one series for each of the fake NVML's two devices, each with its replica.
    (gpu,) = [t for t in targets if t.panel == "GPU utilization"]
    expr = dash.substitute(gpu.expr, values, rate_interval)
    devices = {s["metric"]["device"]: s["metric"]["replica_id"] for s in prom.query(expr)}
    assert devices == {"0": "r0", "1": "r1"}
    # The traffic that made the data: every kind of request went through.
    assert min(stack.traffic.count(k) for k in ("stream", "cancel", "reject")) > 0


def test_every_rule_evaluates(stack: Stack) -> None:
    rules = stack.prom.rules()
    names = {r["name"] for r in rules}
    assert names == {
        "OrchdScrapeDown", "OrchdNoReadyReplica", "OrchdQueueTimeHigh",
        "OrchdHighRejectionRatio", "OrchdEngineRestarts", "OrchdGpuMemoryNearFull",
    }  # fmt: skip
    wait_for(
        lambda: all(r.get("lastEvaluation", "").startswith("2") for r in stack.prom.rules()),
        ALERT_TIMEOUT_S,
        "every rule to be evaluated",
    )
    bad = [(r["name"], r.get("lastError")) for r in stack.prom.rules() if r["health"] != "ok"]
    assert not bad


def test_rejection_ratio_alert_fires_under_the_traffic(stack: Stack) -> None:
    """The traffic's mix has 1 refusal in 5 submissions (20 % > 5 %)."""
    prom = stack.prom
    wait_for(lambda: firing(prom, "OrchdHighRejectionRatio"), ALERT_TIMEOUT_S, "rejection alert")
    (alert,) = firing(prom, "OrchdHighRejectionRatio")
    assert 0.05 < float(alert["value"]) < 0.6
    assert alert["annotations"]["runbook"]


def test_scrape_down_alert_fires_when_orchd_stops(stack: Stack) -> None:
    """Last: it stops the stack's orchd (its fixture then finds it stopped)."""
    prom = stack.prom
    assert not prom.alerts("OrchdScrapeDown")
    stack.traffic.__exit__(None, None, None)
    assert stack.orchd.stop() == 0
    wait_for(lambda: firing(prom, "OrchdScrapeDown"), ALERT_TIMEOUT_S, "OrchdScrapeDown")
    (alert,) = firing(prom, "OrchdScrapeDown")
    assert alert["labels"]["instance"] == f"127.0.0.1:{stack.orchd.port}"
