"""The operator page (/ui) in a real headless browser: Debian's chromium driven over the Chrome
DevTools Protocol by playwright (``executable_path``, no browser download), against a real
orchd under traffic, with the fake NVML's two GPUs (tests/fakes/nvml.py).

Screenshots are test artifacts: each is written under the test's tmp dir and, when
``ORCHD_ARTIFACTS`` is set, to ``tests/artifacts/`` as well (``ui-live.png``,
``ui-drained.png``, ``ui-playground.png``, ``ui-canceled.png``).

Every wait is on a condition with a deadline (playwright's own waits, or ``wait_for``); the
deadlines are generous, as this runs on loaded two-core machines.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.integration.conftest import stream
from tests.support.daemon import Daemon
from tests.support.sse import sync_request
from tests.support.tasks import task_body
from tests.support.wait import wait_for

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
WAIT_MS = 60_000  # any one condition in the page
ADMIN, CLIENT = "admin-key-ui", "client-key-ui"
CONFIG = f"""
[server]
api_keys = ["{ADMIN}", {{key = "{CLIENT}", role = "client"}}]

[[pools]]
id = "main"
model_ref = "mock:tiny"
[[pools]]
id = "spare"
model_ref = "mock:other"

[[replicas]]
id = "m0"
pool_id = "main"
devices = "0"
[replicas.mock]
itl_ms = 5
[[replicas]]
id = "m1"
pool_id = "main"
devices = "1"
[replicas.mock]
itl_ms = 5
[[replicas]]
id = "s0"
pool_id = "spare"
model_ref = "mock:other"
[replicas.mock]
itl_ms = 20
"""


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    env = {"ORCHD_NVML_MODULE": "tests.fakes.nvml"}
    with Daemon(tmp_path_factory.mktemp("ui"), CONFIG, env=env, key=ADMIN) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def page(browser: Browser, d: Daemon) -> Iterator[Page]:
    """One signed-in page that the tests below share (the feed keeps it current)."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"{d.base}/ui")
    pg.fill("#key", ADMIN)
    pg.click("#login-submit")
    expect(pg.locator("#app")).to_be_visible(timeout=WAIT_MS)
    yield pg
    context.close()
    assert not errors, errors  # no script error on the page the whole time


@pytest.fixture
def traffic(d: Daemon) -> Iterator[list[int]]:
    """Tasks submitted and streamed back to back by a client key until the test ends;
    yields the list of statuses the submissions got."""
    stop = threading.Event()
    statuses: list[int] = []

    def run() -> None:
        with httpx.Client(base_url=d.base, headers={"X-API-Key": CLIENT}, timeout=30) as c:
            while not stop.is_set():
                body = task_body(
                    max_tokens=40, priority="batch" if len(statuses) % 3 else "interactive"
                )
                r = c.post("/v1/tasks", json=body)
                statuses.append(r.status_code)
                if r.status_code == 202:
                    with c.stream("GET", f"/v1/tasks/{body['task_id']}/stream") as s:
                        s.read()
                else:
                    stop.wait(0.05)  # refused (a drain): try again shortly

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield statuses
    stop.set()
    t.join(30)


def shot(pg: Page, name: str, tmp_path: Path) -> Path:
    """A full-page screenshot kept as a test artifact."""
    path = tmp_path / name
    pg.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("ORCHD_ARTIFACTS"):
        out = REPO / "tests" / "artifacts"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    return path


def readyz(d: Daemon) -> tuple[int, dict[str, Any]]:
    status, _, raw = sync_request(d.host, d.port, "GET", "/readyz", {})
    return status, json.loads(raw)


def pool_draining(d: Daemon, pool: str) -> bool:
    status, _, raw = sync_request(
        d.host, d.port, "GET", f"/v1/pools/{pool}/health", {"X-API-Key": ADMIN}
    )
    assert status == 200
    return bool(json.loads(raw)["draining"])


def confirm(pg: Page, field: str | None = None) -> None:
    dialog = pg.locator("dialog#confirm")
    expect(dialog).to_be_visible()
    if field is not None:
        dialog.locator("#confirm-field").fill(field)
    dialog.locator("#confirm-yes").click()
    expect(dialog).to_be_hidden()


def number(pg: Page, selector: str) -> float:
    return float(pg.locator(selector).inner_text().replace(",", "").split()[0])


# ---------------------------------------------------------------- the tests


def test_signing_in_needs_an_admin_key(browser: Browser, d: Daemon) -> None:
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    try:
        pg.goto(f"{d.base}/ui")  # the page itself loads with no key
        expect(pg.locator("#login")).to_be_visible()
        expect(pg.locator("#app")).to_be_hidden()
        pg.fill("#key", "not-a-key")
        pg.click("#login-submit")
        expect(pg.locator("#login-error")).to_contain_text("not accepted")
        pg.fill("#key", CLIENT)
        pg.click("#login-submit")
        expect(pg.locator("#login-error")).to_contain_text("needs an admin API key")
        pg.fill("#key", ADMIN)
        pg.click("#login-submit")
        expect(pg.locator("#app")).to_be_visible()
        assert pg.evaluate("sessionStorage.getItem('orchd.adminKey')") == ADMIN
        expect(pg.locator("#version")).to_contain_text("v0.")
        pg.reload()  # the key lives in this tab's session: still signed in
        expect(pg.locator("#app")).to_be_visible()
        expect(pg.locator("#conn")).to_have_text("live")
        pg.click("#logout")
        expect(pg.locator("#login")).to_be_visible()
        assert pg.evaluate("sessionStorage.getItem('orchd.adminKey')") is None
    finally:
        context.close()


def test_live_numbers_change_under_traffic(
    page: Page, d: Daemon, traffic: list[int], tmp_path: Path
) -> None:
    pg = page
    expect(pg.locator("#conn")).to_have_text("live")
    expect(pg.locator("#gpus .gpu")).to_have_count(2)
    start = number(pg, "#tokens-out")
    pg.wait_for_function(
        "n => Number(document.getElementById('tokens-out').textContent.replace(/,/g, '')) > n",
        arg=start + 200,
    )
    mid = number(pg, "#tokens-out")
    pg.wait_for_function(  # ... and it goes on moving, a frame a second
        "n => Number(document.getElementById('tokens-out').textContent.replace(/,/g, '')) > n",
        arg=mid,
    )
    assert traffic.count(202) >= 3
    # Recent tasks with their outcome and timings; a replica with a token rate and TTFT.
    expect(pg.locator("#recent tbody tr").first).to_contain_text("length")
    assert pg.locator("#recent tbody tr").count() >= 3
    pg.wait_for_function(
        "() => [...document.querySelectorAll('#pools tr.replica td.rate')]"
        ".some(td => Number(td.textContent) > 0)"
    )
    pg.wait_for_function(
        "() => [...document.querySelectorAll('#pools tr.replica td.ttft')]"
        ".some(td => /\\d · \\d/.test(td.textContent))"
    )
    # Each GPU: utilization, VRAM, power, temperature, and a sparkline that grows.
    gpu = pg.locator('#gpus .gpu[data-index="0"]')
    expect(gpu).to_contain_text("replica m0")
    for cls, unit in (("util", "%"), ("vram", "/"), ("power", "W"), ("temp", "°C")):
        expect(gpu.locator(f".v.{cls}")).to_contain_text(unit)
    before = [pg.locator(f'#gpus .gpu[data-index="{i}"] .util').inner_text() for i in (0, 1)]
    pg.wait_for_function(
        "b => [0, 1].some(i => document.querySelector(`#gpus .gpu[data-index='${i}'] .util`)"
        ".textContent !== b[i])",
        arg=before,
    )
    pg.wait_for_function(
        "() => document.querySelector('#gpus .gpu .line-util').getAttribute('points')"
        ".trim().split(' ').length >= 5"
    )
    shot(pg, "ui-live.png", tmp_path)


def test_drain_and_undrain_from_the_page_move_readiness(
    page: Page, d: Daemon, tmp_path: Path
) -> None:
    pg = page
    drain_main = pg.locator('button[data-action="drain"][data-pool="main"]')
    # The confirmation guards the action: called off, nothing changes.
    drain_main.click()
    expect(pg.locator("dialog#confirm")).to_be_visible()
    expect(pg.locator("#confirm-title")).to_have_text("Drain pool main?")
    pg.locator("#confirm-no").click()
    expect(pg.locator("dialog#confirm")).to_be_hidden()
    assert not pool_draining(d, "main")

    drain_main.click()
    confirm(pg, "5000")
    expect(pg.locator('#pools tr.pool[data-pool="main"] td').nth(1)).to_have_text("draining")
    assert pool_draining(d, "main")
    status, body = readyz(d)
    assert status == 200  # the spare pool still serves
    assert {r["replica_id"] for r in body["not_ready"]} == {"m0", "m1"}

    pg.locator('button[data-action="drain"][data-pool="spare"]').click()
    confirm(pg, "0")
    wait_for(lambda: readyz(d)[0] == 503, 30, "/readyz to say not ready")
    assert {r["replica_id"] for r in readyz(d)[1]["not_ready"]} == {"m0", "m1", "s0"}
    expect(pg.locator("#ready")).to_have_text("not ready")
    shot(pg, "ui-drained.png", tmp_path)

    for pool in ("main", "spare"):
        pg.locator(f'button[data-action="undrain"][data-pool="{pool}"]').click()
        confirm(pg)
        expect(pg.locator(f'#pools tr.pool[data-pool="{pool}"] td').nth(1)).to_have_text("ready")
    wait_for(lambda: readyz(d)[0] == 200, 30, "/readyz to say ready again")
    assert readyz(d)[1]["not_ready"] == []
    expect(pg.locator("#ready")).to_have_text("ready")


def test_reload_from_the_page(page: Page, d: Daemon) -> None:
    pg = page
    version = pg.locator('#pools tr.pool[data-pool="spare"] td').nth(3)
    expect(version).to_contain_text("(v1)")
    pg.locator('button[data-action="reload"][data-pool="spare"]').click()
    expect(pg.locator("#confirm-title")).to_have_text("Reload pool spare?")
    assert pg.locator("#confirm-field").input_value() == "mock:other"  # its model, offered
    confirm(pg)
    expect(pg.locator("#notice")).to_have_text("reload spare: now serving mock:other (v2)")
    expect(version).to_contain_text("(v2)")


def test_playground_streams_tokens(page: Page, d: Daemon, tmp_path: Path) -> None:
    pg = page
    model = json.dumps({"engine": "mock", "model_ref": "mock:other"}, separators=(",", ":"))
    pg.wait_for_function(
        "v => [...document.querySelectorAll('#pg-model option')].some(o => o.value === v)",
        arg=model,
    )
    pg.select_option("#pg-model", model)
    pg.fill("#pg-max", "100")  # 20 ms a token on the spare pool: about 2 s of streaming
    pg.fill("#pg-prompt", "Tell the operator a story")
    pg.click("#pg-run")
    # Seen mid-stream: some tokens out, not all of them yet.
    pg.wait_for_function(
        "() => { const m = /: (\\d+) tokens · TTFT/.exec(document.getElementById('pg-stats')"
        ".textContent); return m && Number(m[1]) > 0 && Number(m[1]) < 100; }"
    )
    assert pg.locator("#pg-out").inner_text().strip()
    expect(pg.locator("#pg-stats")).to_contain_text("length, 100 tokens")
    expect(pg.locator("#pg-run")).to_be_enabled()
    shot(pg, "ui-playground.png", tmp_path)
    # The playground's task shows among the recent ones, run on the spare pool.
    expect(pg.locator('#recent tbody tr[data-task*="/ui-"]').first).to_contain_text("spare / s0")


def test_an_admin_cancels_another_tenants_task_from_the_page(
    page: Page, d: Daemon, tmp_path: Path
) -> None:
    pg = page
    tid = f"long-{uuid.uuid4().hex[:8]}"
    body = task_body(task_id=tid, model_ref="mock:other", max_tokens=5000)  # ~100 s
    status, _, raw = sync_request(d.host, d.port, "POST", "/v1/tasks", {"X-API-Key": CLIENT}, body)
    assert status == 202, raw
    s = stream(d, tid, {"X-API-Key": CLIENT})
    s.read_until(lambda s: any(e.event == "token" for e in s.events), 30)
    row = pg.locator(f'#tasks tbody tr[data-task$="/{tid}"]')
    expect(row).to_contain_text("running")
    expect(row).to_contain_text("streaming on frontend 0")
    row.locator('button[data-action="cancel"]').click()
    expect(pg.locator("#confirm-title")).to_have_text(f"Cancel task {tid}?")
    confirm(pg)
    events = s.read_to_end(30)
    assert events[-1].event == "end" and events[-1].json["reason"] == "canceled"
    assert len([e for e in events if e.event == "token"]) < 5000
    expect(pg.locator("#notice")).to_have_text(f"cancel {tid}: canceled")
    expect(pg.locator(f'#recent tbody tr[data-task$="/{tid}"]')).to_contain_text("canceled")
    expect(row).to_have_count(0)
    shot(pg, "ui-canceled.png", tmp_path)
