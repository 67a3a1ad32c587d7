"""The OpenAI-compatible adapter against a fake vLLM-style server (completions and chat)."""

from __future__ import annotations

from typing import Any

from engine_procs.adapters.http_base import HttpAdapter, StreamState
from engine_procs.adapters.openai import OpenAIAdapter
from tests.fakes import scenarios as sc
from tests.fakes.engines import MODEL, FakeEngine, Faults
from tests.fakes.sink import RecordingSink

CLS, DIALECT = OpenAIAdapter, "openai"


def test_completions_stream_seeded_tokens_and_pass_parameters() -> None:
    bodies = sc.run(CLS, DIALECT, sc.completes)
    first = next(b for b in bodies if b["max_tokens"] == 8)
    assert first == {
        "model": MODEL,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},  # the final usage chunk: prompt tokens
        "seed": 7,
        "prompt": "say hi",
    }


def test_chat_completions_stream_seeded_tokens() -> None:
    bodies = sc.run(CLS, DIALECT, sc.completes, chat=True)
    first = next(b for b in bodies if b["max_tokens"] == 8)
    assert first["messages"] == [{"role": "user", "content": "say hi"}]
    assert "prompt" not in first


def test_usage_comes_from_the_usage_chunk_only() -> None:
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    st = StreamState(sc.req(1, 2))
    chunk = '{"choices": [{"index": 0, "text": "a", "finish_reason": null}], "usage": null}'
    adapter.on_event("message", chunk, st)
    assert st.prompt_tokens is None  # "usage": null on every other chunk
    usage = '{"prompt_tokens": 17, "completion_tokens": 2, "total_tokens": 19}'
    adapter.on_event("message", f'{{"choices": [], "usage": {usage}}}', st)
    assert st.prompt_tokens == 17
    # An engine that ignores stream_options sends no usage: nothing is reported.
    quiet = StreamState(sc.req(2, 1))
    adapter.on_event("message", '{"choices": [{"text": "a", "finish_reason": "length"}]}', quiet)
    adapter.on_event("message", "[DONE]", quiet)
    assert quiet.finish == "length" and quiet.prompt_tokens is None


def test_reads_model_version_and_context() -> None:
    async def look(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> dict[str, Any]:
        return {"v": a.engine_version, "ctx": a.ctx_max, "slots": a.slots, "model": a.model}

    got = sc.run(CLS, DIALECT, look)
    assert got == {"v": "fake-1.2.3", "ctx": 4096, "slots": None, "model": MODEL}


def test_stop_finish_reason() -> None:
    sc.run(CLS, DIALECT, sc.eos_is_stop, Faults(eos_at=3))


def test_chat_stop_finish_reason() -> None:
    sc.run(CLS, DIALECT, sc.eos_is_stop, Faults(eos_at=2), chat=True)


def test_mid_stream_disconnect_is_worker_reset() -> None:
    sc.run(CLS, DIALECT, sc.disconnect_is_worker_reset, Faults(disconnect_after=3))


def test_malformed_chunk_is_internal_and_hangs_up() -> None:
    sc.run(CLS, DIALECT, sc.malformed_is_internal, Faults(malformed_after=2, token_delay_s=0.01))


def test_error_chunk_is_internal() -> None:
    sc.run(CLS, DIALECT, sc.engine_error_is_internal, Faults(error_after=2))


def test_slow_first_token_within_timeout_completes() -> None:
    sc.run(CLS, DIALECT, sc.slow_first_token_ok, Faults(first_token_delay_s=0.3))


def test_no_first_token_is_decode_timeout() -> None:
    faults = Faults(first_token_delay_s=3.0)
    sc.run(CLS, DIALECT, sc.no_token_is_decode_timeout, faults, decode_timeout_ms=200)


def test_503_passes_retry_after() -> None:
    sc.run(CLS, DIALECT, sc.overloaded_503, Faults(reject_503=1, retry_after="5"))


def test_cancel_reaches_the_server() -> None:
    sc.run(CLS, DIALECT, sc.cancel_reaches_server, Faults(token_delay_s=0.01))


def test_connection_refused_is_worker_reset_and_engine_dead() -> None:
    sc.connection_refused(CLS)


def test_start_waits_for_health_and_gives_up_with_a_reason() -> None:
    sc.not_ready_in_time(CLS)
