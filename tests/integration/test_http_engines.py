"""Real engines' wire formats through the whole daemon: replicas whose adapters speak HTTP to
fake engine servers (external ones run here; one started by its supervisor from a command),
streaming, cancel reaching the engine, an engine that dies and is restarted, and an engine
command that never starts opening the circuit breaker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.engines import FakeEngine, Faults, prompt_tokens, tokens_for
from tests.integration.conftest import cancel, metric, run_task, stream, submit
from tests.support.daemon import Daemon
from tests.support.sse import sync_request
from tests.support.wait import wait_for

ROOT = str(Path(__file__).resolve().parents[2])


def config(llama: FakeEngine, vllm: FakeEngine) -> str:
    fake_tgi = [sys.executable, "-m", "tests.fakes.engines", "tgi", "--port", "{port}"]
    return f"""
[server]
restart_backoff_ms = 20
restart_backoff_max_ms = 100

[[replicas]]
id = "llama"
pool_id = "llama"
engine = "llamacpp"
slots = 8
[replicas.endpoint]
url = "{llama.url}"

[[replicas]]
id = "vllm"
pool_id = "vllm"
engine = "vllm"
slots = 8
[replicas.endpoint]
url = "{vllm.url}"

[[replicas]]
id = "tgi-cmd"
pool_id = "tgi"
engine = "tgi"
slots = 4
[replicas.endpoint]
command = {json.dumps([*fake_tgi, "--exit-after", "2", "--version", "{model}", "--model-path", "{model_path}"])}
model = "tgi-9.9"
ready_timeout_s = 30

"""


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[FakeEngine, FakeEngine]]:
    llama = FakeEngine("llamacpp", Faults(token_delay_s=0.002)).start_in_thread()
    vllm = FakeEngine("openai", version="0.6.3").start_in_thread()
    try:
        yield llama, vllm
    finally:
        llama.stop_thread()
        vllm.stop_thread()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The daemon's model root, holding the files a reload names (file: refs resolve only
    under a root)."""
    root = tmp_path_factory.mktemp("models")
    for name in ("llama-v2.gguf", "tgi-v2.safetensors"):
        (root / name).write_bytes(b"weights")
    return root


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, engines: tuple[FakeEngine, FakeEngine], models: Path
) -> Iterator[Daemon]:
    roots = f'\n[catalog]\nmodel_roots = ["{models}"]\n'
    d = Daemon(
        tmp_path_factory.mktemp("http-engines"),
        config(*engines) + roots,
        env={"PYTHONPATH": ROOT},
    ).start()
    try:
        for replica in ("llama", "vllm", "tgi-cmd"):
            d.wait_log(lambda r, rep=replica: ready(r, rep), 30)
        yield d
    finally:
        assert d.stop() == 0


def ready(rec: dict[str, object], replica: str) -> bool:
    return rec.get("narration") == "engine ready" and rec.get("replica_id") == replica


def texts(events: list) -> list[str]:  # type: ignore[type-arg]
    return [e.json["t"] for e in events if e.event == "token"]


def tokens_in(d: Daemon) -> float:
    """``tokens_in_total`` once every task has ended at the scheduler."""
    wait_for(lambda: metric(d, "replica_active_slots") == 0, 10, "tasks to settle")
    return metric(d, "tokens_in_total")


def test_llamacpp_task_streams_end_to_end(daemon: Daemon) -> None:
    before = tokens_in(daemon)
    s = run_task(daemon, engine="llamacpp", max_tokens=16, seed=11, prompt="hello there")
    started, end = s.events[0].json, s.events[-1].json
    assert started["engine"] == "llamacpp" and started["replica_id"] == "llama"
    assert started["engine_version"] == "bfake-1.2.3"  # llama-server's /props build_info
    assert texts(s.events) == tokens_for(11, "hello there", 16)
    assert s.events[-1].event == "end" and end["reason"] == "length"
    assert end["tokens_out"] == 16
    # The prompt's length as llama-server said it (tokens_evaluated): 3 fake tokens.
    assert tokens_in(daemon) - before == prompt_tokens("hello there") == 3


def test_vllm_task_streams_end_to_end(daemon: Daemon) -> None:
    before = tokens_in(daemon)
    s = run_task(daemon, engine="vllm", max_tokens=9, seed=3, prompt='é "q" \\ ok')
    assert s.events[0].json["engine_version"] == "0.6.3"  # vLLM's GET /version
    assert texts(s.events) == tokens_for(3, 'é "q" \\ ok', 9)
    assert s.events[-1].json["reason"] == "length"
    # The prompt's length from the stream's usage chunk: 5 fake tokens.
    assert tokens_in(daemon) - before == prompt_tokens('é "q" \\ ok') == 5


def test_cancel_reaches_the_engine(daemon: Daemon, engines: tuple[FakeEngine, FakeEngine]) -> None:
    llama, _ = engines
    before = len(llama.canceled)
    status, body, _ = submit(daemon, engine="llamacpp", max_tokens=5000)
    assert status == 202
    s = stream(daemon, body["task_id"])
    s.read_until(lambda st: sum(e.event == "token" for e in st.events) >= 3)
    assert cancel(daemon, body["task_id"]) == 204
    events = s.read_to_end()
    assert events[-1].event == "end" and events[-1].json["reason"] == "canceled"
    wait_for(lambda: len(llama.canceled) > before, 10, "the engine to see the request go")
    s.close()


def test_engine_started_from_a_command_is_restarted_after_it_dies(daemon: Daemon) -> None:
    first = daemon.wait_log(lambda r: ready(r, "tgi-cmd"), 10)
    assert first["engine_version"] == "tgi-9.9"  # {model} reached the engine's command line
    for seed in (1, 2):  # the fake TGI exits after its second request
        s = run_task(daemon, engine="tgi", max_tokens=5, seed=seed)
        assert texts(s.events) == tokens_for(seed, "hello", 5)
    daemon.wait_log(
        lambda r: r.get("narration") == "engine died" and r.get("replica_id") == "tgi-cmd", 10
    )
    wait_for(lambda: daemon.count_log(lambda r: ready(r, "tgi-cmd")) >= 2, 30, "engine restart")
    before = tokens_in(daemon)
    s = run_task(daemon, engine="tgi", max_tokens=5, seed=3)
    assert texts(s.events) == tokens_for(3, "hello", 5)
    assert s.events[-1].json["reason"] == "length"
    # The prompt's length from TGI's last event (details.input_length): 2 fake tokens.
    assert tokens_in(daemon) - before == prompt_tokens("hello") == 2


def test_reload_restarts_a_command_engine_on_the_new_model_and_refuses_an_external_one(
    daemon: Daemon, models: Path
) -> None:
    def reload(pool: str, ref: str) -> tuple[int, dict[str, object]]:
        status, _, raw = sync_request(
            daemon.host,
            daemon.port,
            "POST",
            f"/v1/pools/{pool}/reload",
            daemon.headers,
            {"new_model_ref": ref},
        )
        return status, json.loads(raw)

    status, body = reload("llama", f"file:{models}/llama-v2.gguf")
    assert status == 409 and body["code"] == "RELOAD_FAILED"
    assert "no endpoint.command" in str(body["message"])
    assert run_task(daemon, engine="llamacpp", max_tokens=3).events[-1].event == "end"
    ref = f"file:{models}/tgi-v2.safetensors"
    status, body = reload("tgi", ref)
    assert status == 200 and body["model_ref"] == ref
    s = run_task(daemon, engine="tgi", model_ref=ref, max_tokens=5, seed=4)
    # {model_path} on the engine's command line is the new file: the fake reports it.
    assert s.events[0].json["engine_version"] == "tgi-9.9+tgi-v2.safetensors"
    assert texts(s.events) == tokens_for(4, "hello", 5)


BROKEN = [sys.executable, "-c", "import sys; print('cannot load model'); sys.exit(4)"]


class UnreadyDaemon(Daemon):
    """Started like :class:`Daemon`, but not waiting for "ready": with a replica whose engine
    never starts, orchd does not announce ready."""

    def start(self) -> Daemon:
        cmd = [sys.executable, "-m", "orchd.cli", "serve", "--config", str(self.config_path)]
        self.proc = subprocess.Popen(
            [*cmd, "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=self.env
        )
        self.read_log()
        return self


def test_engine_that_never_starts_opens_the_circuit(tmp_path: Path) -> None:
    cfg = f"""
[server]
restart_backoff_ms = 20
restart_backoff_max_ms = 100

[[replicas]]
id = "broken"
engine = "triton"
[replicas.endpoint]
command = {json.dumps(BROKEN)}
model = "fake-model"
"""
    d = UnreadyDaemon(tmp_path, cfg).start()
    try:

        def failed(r: dict[str, object]) -> bool:
            return (
                r.get("narration") == "engine failed to start" and r.get("replica_id") == "broken"
            )

        rec = d.wait_log(lambda r: r.get("narration") == "engine circuit open", 30)
        assert rec["failures"] == 5 and rec["replica_id"] == "broken"
        err = d.wait_log(failed, 1)["error"]
        assert "exited with status 4" in err and "cannot load model" in err
        # The scheduler was told why (pool health's last_error comes from this).
        status = d.wait_log(lambda r: "circuit open" in str(r.get("last_error", "")), 5)
        assert status["narration"] == "replica is not ready"
        assert d.count_log(failed) == 5  # the breaker holds further starts for its cool-down
    finally:
        assert d.stop() == 0
