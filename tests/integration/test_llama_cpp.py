"""orchd against a real llama.cpp server: ``llama-server`` built from llama-cpp-python's sdist
(``make llama-server``), on a tiny GGUF model the tests make, started by its supervisor from
``[replicas.endpoint] command``. Both adapters that speak to it run: ``llamacpp`` (llama.cpp's
native ``/completion``) and ``openai`` (its ``/v1/completions``, as engine ``vllm``).

What the fakes cannot show, asked of the engine itself (its ``/slots``, ``/metrics``,
``/tokenize``, ``/props``): the text streamed is what the engine samples for that seed; a cancel
stops the engine generating; a killed server ends the task with ``WORKER_RESET`` and is
restarted; a reload starts it on another GGUF; ``tokens_in_total`` grows by the engine's own
count of the prompt's tokens.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.conftest import cancel, metric, run_task, stream, submit
from tests.support.daemon import Daemon
from tests.support.llama import SLOT_CTX, prompt_token_count
from tests.support.llama_build import LLAMA_CPP_PYTHON_VERSION
from tests.support.sse import Event, sync_request
from tests.support.wait import wait_for

ENGINES = ["llamacpp", "vllm"]  # the task's engine: the llamacpp and the openai adapter
REPLICA = {"llamacpp": "llama", "vllm": "oai"}  # replica id = pool id
INDEX = {"llamacpp": "0", "vllm": "1"}  # the replica's place in the config (supervisor argv)
LONG = SLOT_CTX - 64  # far more tokens than a stream runs before a test cancels or kills it


def config(command: list[str], model: Path, roots: list[Path]) -> str:
    replicas = ""
    for engine in ENGINES:
        replicas += f"""
[[replicas]]
id = "{REPLICA[engine]}"
pool_id = "{REPLICA[engine]}"
engine = "{engine}"
model_ref = "file:{model}"
slots = 2
[replicas.endpoint]
command = {json.dumps(command)}
model = "tiny"
ready_timeout_s = 60
"""
    return f"""
[server]
restart_backoff_ms = 20
restart_backoff_max_ms = 100

[catalog]
model_roots = {json.dumps([str(r) for r in roots])}
{replicas}"""


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory,
    llama_server_command: list[str],
    llama_model: Path,
    llama_model_b: Path,
) -> Iterator[Daemon]:
    roots = [llama_model.parent, llama_model_b.parent]  # a reload names file: models there
    cfg = config(llama_server_command, llama_model, roots)
    d = Daemon(tmp_path_factory.mktemp("llama-cpp"), cfg)
    d.start()
    try:
        for engine in ENGINES:
            d.wait_log(functools.partial(ready, replica=REPLICA[engine]), 60)
        yield d
    finally:
        assert d.stop() == 0


def ready(rec: dict[str, Any], replica: str) -> bool:
    return rec.get("narration") == "engine ready" and rec.get("replica_id") == replica


@dataclass
class Engine:
    """One running llama-server, reached directly (not through orchd)."""

    proc: psutil.Process
    port: int

    def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", trust_env=False) as c:
            resp = c.request(method, path, json=body, timeout=30)
        resp.raise_for_status()
        return resp

    def get(self, path: str) -> Any:
        return self._call("GET", path).json()

    def post(self, path: str, body: Any) -> Any:
        return self._call("POST", path, body).json()

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in self._call("GET", "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def busy_slots(self) -> list[dict[str, Any]]:
        return [s for s in self.get("/slots") if s["is_processing"]]


def engine_of(d: Daemon, engine: str) -> Engine:
    """The live llama-server under the replica's supervisor (waits for one, e.g. a restart)."""
    sup = d.find("engine_procs.supervisor", INDEX[engine])
    found: list[psutil.Process] = []

    def one() -> bool:
        found[:] = [
            p
            for p in sup.children(recursive=True)
            if p.name() == "llama-server" and p.status() != psutil.STATUS_ZOMBIE
        ]
        return len(found) == 1

    wait_for(one, 30, f"one llama-server under {REPLICA[engine]}'s supervisor")
    cmd = found[0].cmdline()
    return Engine(found[0], int(cmd[cmd.index("--port") + 1]))


def stops(d: Daemon, engine: str) -> list[int]:
    """``n_tokens`` of each "stop processing" line in the engine's own log (llama-server writes
    one as a slot is released: ``server_slot::release`` in tools/server/server-context.cpp)."""
    log = Path(d.run_dir) / f"engine-{REPLICA[engine]}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [int(n) for n in re.findall(r"stop processing: n_tokens = (\d+)", text)]


def ref(model: Path) -> str:
    return f"file:{model}"


def texts(events: list[Event]) -> list[str]:
    return [e.json["t"] for e in events if e.event == "token"]


def tokens_in(d: Daemon) -> float:
    """``tokens_in_total`` once every task has ended at the scheduler."""
    wait_for(lambda: metric(d, "replica_active_slots") == 0, 10, "tasks to settle")
    return metric(d, "tokens_in_total")


def sample(d: Daemon, engine: str, model: str, seed: int, prompt: str, n: int = 16) -> str:
    s = run_task(d, engine=engine, model_ref=model, max_tokens=n, seed=seed, prompt=prompt)
    assert s.events[-1].event == "end", s.events[-1]
    return "".join(texts(s.events))


@pytest.mark.parametrize("engine", ENGINES)
def test_streams_what_the_engine_samples_and_counts_its_prompt_tokens(
    daemon: Daemon, engine: str, llama_model: Path
) -> None:
    eng = engine_of(daemon, engine)
    prompt = "the quick brown fox"
    before = tokens_in(daemon)
    s = run_task(
        daemon, engine=engine, model_ref=ref(llama_model), max_tokens=24, seed=7, prompt=prompt
    )
    started, end = s.events[0], s.events[-1]
    assert started.event == "started" and started.json["replica_id"] == REPLICA[engine]
    if engine == "llamacpp":  # /props build_info, as the build stamped it
        assert started.json["engine_version"] == f"b0-llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    pieces = texts(s.events)
    assert len(pieces) == 24 and all(pieces)  # one non-empty piece per sampled token
    assert end.event == "end" and end.json["reason"] == "length" and end.json["tokens_out"] == 24
    # The same request sent to the engine directly, not streamed: the same text.
    direct = eng.post("/completion", {"prompt": prompt, "n_predict": 24, "seed": 7})
    assert "".join(pieces) == direct["content"]
    # usage: the engine's own count of the prompt's tokens reached tokens_in_total.
    n = len(eng.post("/tokenize", {"content": prompt})["tokens"])
    assert n == prompt_token_count(prompt) == direct["tokens_evaluated"]
    assert tokens_in(daemon) - before == n


@pytest.mark.parametrize("engine", ENGINES)
def test_a_seed_fixes_the_sample(daemon: Daemon, engine: str, llama_model: Path) -> None:
    first, again, other = (
        sample(daemon, engine, ref(llama_model), seed, "once upon a time") for seed in (3, 3, 4)
    )
    assert first == again
    assert first != other


@pytest.mark.parametrize("engine", ENGINES)
def test_cancel_stops_the_engine_generating(daemon: Daemon, engine: str, llama_model: Path) -> None:
    eng = engine_of(daemon, engine)
    decodes = eng.metrics()["llamacpp:n_decode_total"]
    logged = len(stops(daemon, engine))
    status, body, _ = submit(
        daemon, engine=engine, model_ref=ref(llama_model), max_tokens=LONG, prompt="hello world"
    )
    assert status == 202
    s = stream(daemon, body["task_id"])
    s.read_until(lambda st: sum(e.event == "token" for e in st.events) >= 3)
    busy = eng.busy_slots()
    assert len(busy) == 1  # the engine is generating this task
    assert cancel(daemon, body["task_id"]) == 204
    events = s.read_to_end()
    s.close()
    assert events[-1].event == "end" and events[-1].json["reason"] == "canceled"
    # The engine's own word: its slot frees, and its log says where it stopped: with far fewer
    # tokens than LONG made ...
    wait_for(lambda: not eng.busy_slots(), 10, "the engine's slot to free")
    wait_for(lambda: len(stops(daemon, engine)) > logged, 10, "the engine to log the stop")
    assert 3 < stops(daemon, engine)[-1] < LONG // 2  # prompt + tokens in the slot at release
    # ... and its metrics agree: nothing in progress, and it stopped calling decode.
    m = eng.metrics()
    assert m["llamacpp:requests_processing"] == 0
    assert m["llamacpp:n_decode_total"] - decodes < LONG // 2


def test_a_killed_server_ends_the_task_with_worker_reset_and_is_restarted(
    daemon: Daemon, llama_model: Path
) -> None:
    eng = engine_of(daemon, "llamacpp")
    starts = daemon.count_log(lambda r: ready(r, "llama"))
    status, body, _ = submit(
        daemon, engine="llamacpp", model_ref=ref(llama_model), max_tokens=LONG, prompt="hello"
    )
    assert status == 202
    s = stream(daemon, body["task_id"])
    s.read_until(lambda st: sum(e.event == "token" for e in st.events) >= 3)
    eng.proc.kill()
    events = s.read_to_end()
    s.close()
    assert events[-1].event == "error" and events[-1].json["code"] == "WORKER_RESET"
    daemon.wait_log(
        lambda r: r.get("narration") == "engine died" and r.get("replica_id") == "llama", 10
    )
    wait_for(lambda: daemon.count_log(lambda r: ready(r, "llama")) > starts, 60, "a restart")
    assert engine_of(daemon, "llamacpp").proc.pid != eng.proc.pid
    status, _, raw = sync_request(
        daemon.host, daemon.port, "GET", "/v1/pools/llama/health", daemon.headers
    )
    assert status == 200 and "status -9" in json.loads(raw)["last_error"]  # SIGKILL, said so
    s = run_task(daemon, engine="llamacpp", model_ref=ref(llama_model), max_tokens=8, seed=2)
    assert len(texts(s.events)) == 8 and s.events[-1].json["reason"] == "length"


def test_reload_starts_the_engine_on_another_gguf_and_back(
    daemon: Daemon, llama_model: Path, llama_model_b: Path
) -> None:
    def reload(model: Path) -> dict[str, Any]:
        status, _, raw = sync_request(
            daemon.host,
            daemon.port,
            "POST",
            "/v1/pools/llama/reload",
            daemon.headers,
            {"new_model_ref": ref(model)},
        )
        body: dict[str, Any] = json.loads(raw)
        assert status == 200, body
        return body

    prompt = "hello world"
    on_a = sample(daemon, "llamacpp", ref(llama_model), 9, prompt)
    assert reload(llama_model_b)["model_ref"] == ref(llama_model_b)
    eng = engine_of(daemon, "llamacpp")
    assert eng.get("/props")["model_path"] == str(llama_model_b)
    on_b = sample(daemon, "llamacpp", ref(llama_model_b), 9, prompt)
    assert on_b != on_a  # other weights, same seed: another text
    assert reload(llama_model)["model_ref"] == ref(llama_model)
    assert engine_of(daemon, "llamacpp").get("/props")["model_path"] == str(llama_model)
    assert sample(daemon, "llamacpp", ref(llama_model), 9, prompt) == on_a


# ---------------------------------------------------------------- the OpenAI routes through it


@pytest.mark.parametrize("engine", ENGINES)
def test_the_openai_routes_end_to_end(daemon: Daemon, llama_model: Path, engine: str) -> None:
    """orchd's /v1/completions and /v1/chat/completions, driven by the official client, reach
    the real server through each adapter; usage counts are the engine's own."""
    import openai

    # Both pools serve the same model: pin the pool so that each adapter is the one asked.
    pin = {"placement": {"mode": "pin", "pin_pool_id": REPLICA[engine], "allow_fallback": False}}
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="dev", max_retries=0)
    try:
        model = f"file:{llama_model}"
        assert model in [m.id for m in c.models.list()]
        prompt = "the cat sat on"
        r = c.completions.create(model=model, prompt=prompt, max_tokens=6, seed=5, extra_body=pin)
        assert r.choices[0].text and r.choices[0].finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == 6
        assert r.usage.prompt_tokens == prompt_token_count(prompt)
        streamed = c.completions.create(
            model=model, prompt=prompt, max_tokens=6, seed=5, stream=True, extra_body=pin
        )
        assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text
        chat = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            seed=5,
            extra_body=pin,
        )
        assert chat.choices[0].message.content is not None
        assert chat.usage is not None and chat.usage.completion_tokens > 0
    finally:
        c.close()
