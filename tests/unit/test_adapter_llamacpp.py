"""The llama.cpp adapter against a fake llama-server (native /completion stream; chats on its
OpenAI-compatible /v1/chat/completions)."""

from __future__ import annotations

from typing import Any

import pytest

from engine_procs.adapters.http_base import HttpAdapter, StreamFailure, StreamState
from engine_procs.adapters.llamacpp import LlamaCppAdapter
from tests.fakes import scenarios as sc
from tests.fakes.engines import MODEL, FakeEngine, Faults
from tests.fakes.sink import RecordingSink

CLS, DIALECT = LlamaCppAdapter, "llamacpp"


def test_streams_seeded_tokens_and_passes_parameters() -> None:
    bodies = sc.run(CLS, DIALECT, sc.completes)
    first = next(b for b in bodies if b["n_predict"] == 8)
    assert first == {"prompt": "say hi", "n_predict": 8, "stream": True, "seed": 7}


def test_prompt_tokens_from_tokens_evaluated_else_the_final_timings() -> None:
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")

    def read(*events: str) -> int | None:
        st = StreamState(sc.req(1, 4))
        for e in events:
            adapter.on_event("message", e, st)
        return st.prompt_tokens

    partial = '{"content": "a", "stop": false'
    final = '{"content": "", "stop": true, "stop_type": "limit"'
    assert read(partial + ', "tokens_evaluated": 9}') == 9  # current servers: every event
    assert read(partial + "}", final + ', "tokens_evaluated": 9}') == 9
    timings = '"timings": {"prompt_n": 4, "cache_n": 5, "predicted_n": 1}'
    assert read(partial + "}", final + f", {timings}}}") == 9  # computed + from the cache
    assert read(final + ', "timings": {"prompt_n": 4}}') == 4  # a build without cache_n
    assert read(partial + "}", final + "}") is None  # nothing said: nothing reported


def test_reads_version_context_and_slots_from_props() -> None:
    async def look(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> dict[str, Any]:
        return {"v": a.engine_version, "ctx": a.ctx_max, "slots": a.slots, "model": a.model}

    got = sc.run(CLS, DIALECT, look)
    assert got == {"v": "bfake-1.2.3", "ctx": 4096, "slots": 4, "model": f"/models/{MODEL}.gguf"}


def test_eos_ends_with_stop() -> None:
    sc.run(CLS, DIALECT, sc.eos_is_stop, Faults(eos_at=3))


def test_mid_stream_disconnect_is_worker_reset() -> None:
    sc.run(CLS, DIALECT, sc.disconnect_is_worker_reset, Faults(disconnect_after=3))


def test_malformed_chunk_is_internal_and_hangs_up() -> None:
    sc.run(CLS, DIALECT, sc.malformed_is_internal, Faults(malformed_after=2, token_delay_s=0.01))


def test_engine_error_event_is_internal() -> None:
    sc.run(CLS, DIALECT, sc.engine_error_is_internal, Faults(error_after=2))


def test_slow_first_token_within_timeout_completes() -> None:
    sc.run(CLS, DIALECT, sc.slow_first_token_ok, Faults(first_token_delay_s=0.3))


def test_no_first_token_is_decode_timeout() -> None:
    faults = Faults(first_token_delay_s=3.0)
    sc.run(CLS, DIALECT, sc.no_token_is_decode_timeout, faults, decode_timeout_ms=200)


def test_503_passes_retry_after() -> None:
    sc.run(CLS, DIALECT, sc.overloaded_503, Faults(reject_503=1, retry_after="3"))


def test_cancel_reaches_the_server() -> None:
    sc.run(CLS, DIALECT, sc.cancel_reaches_server, Faults(token_delay_s=0.01))


def test_connection_refused_is_worker_reset_and_engine_dead() -> None:
    sc.connection_refused(CLS)


def test_start_waits_for_health_and_gives_up_with_a_reason() -> None:
    sc.not_ready_in_time(CLS)


def test_chats_go_to_its_openai_chat_endpoint_and_stop_strings_everywhere() -> None:
    seen = sc.run(CLS, DIALECT, sc.chat_completes)
    assert [seen[rid].path for rid in (1, 2, 3)] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/completion",
    ]
    assert seen[1].body == {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": 'say "hi"'},
        ],
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 7,
        "model": f"/models/{MODEL}.gguf",  # the model /props named
    }
    assert seen[2].body["stop"] == ["\n\n", "END"]
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    native = sc.req(4)
    native.stop = ["###"]
    assert adapter.request(native)[1]["stop"] == ["###"]  # /completion takes stop too


def test_chat_eos_is_stop() -> None:
    sc.run(CLS, DIALECT, sc.chat_eos_is_stop, Faults(eos_at=3))


def test_chat_stream_of_an_older_build_and_its_errors() -> None:
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    st = StreamState(sc.chat_req(1, 4))
    adapter.on_event(
        "message",
        '{"choices": [{"delta": {"role": "assistant", "content": null}, "finish_reason": null}]}',
        st,
    )
    adapter.on_event(
        "message", '{"choices": [{"delta": {"content": "yes"}, "finish_reason": null}]}', st
    )
    # Builds before include_usage put usage in the finish chunk itself.
    adapter.on_event(
        "message",
        '{"choices": [{"delta": {}, "finish_reason": "stop"}],'
        ' "usage": {"completion_tokens": 1, "prompt_tokens": 12, "total_tokens": 13}}',
        st,
    )
    assert (st.tokens, st.finish, st.prompt_tokens) == (1, "stop", 12)
    with pytest.raises(StreamFailure, match="engine error: context exceeded"):
        adapter.on_event("error", '{"code": 400, "message": "context exceeded"}', st)


def test_chat_error_in_the_stream_is_internal() -> None:
    async def chat_error(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
        a.submit(sc.chat_req(1, 8))
        end = await sink.wait_end(1)
        assert (end.kind, end.reason) == ("error", "INTERNAL"), end
        assert "fault injected" in end.message and len(sink.tokens[1]) == 2

    sc.run(CLS, DIALECT, chat_error, Faults(error_after=2))


def test_embeddings_are_refused() -> None:
    sc.run(CLS, DIALECT, sc.embeddings_refused)
