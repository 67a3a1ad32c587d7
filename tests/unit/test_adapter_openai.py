"""The OpenAI-compatible adapter against a fake vLLM-style server (completions, chat,
embeddings)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine_procs.adapters.http_base import HttpAdapter, StreamFailure, StreamState
from engine_procs.adapters.openai import OpenAIAdapter
from orchd.core.errors import Code
from tests.fakes import scenarios as sc
from tests.fakes.engines import MODEL, FakeEngine, Faults
from tests.fakes.sink import RecordingSink, wait_until

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


def test_chat_messages_go_to_chat_completions_with_stop() -> None:
    seen = sc.run(CLS, DIALECT, sc.chat_completes)
    assert [seen[rid].path for rid in (1, 2, 3)] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/v1/completions",
    ]
    assert seen[1].body == {
        "model": MODEL,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 7,
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": 'say "hi"'},
        ],
    }
    assert seen[2].body["messages"] == [{"role": "user", "content": "a\nmultiline\nturn"}]
    assert seen[2].body["stop"] == ["\n\n", "END"]
    assert "stop" not in seen[3].body and "messages" not in seen[3].body


def test_chat_messages_win_over_endpoint_chat() -> None:
    seen = sc.run(CLS, DIALECT, sc.chat_completes, chat=True)
    assert seen[1].body["messages"][0] == {"role": "system", "content": "Answer in one word."}
    assert seen[3].body["messages"] == [{"role": "user", "content": "say hi"}]  # endpoint.chat


def test_chat_eos_is_stop_with_the_finish_chunk() -> None:
    sc.run(CLS, DIALECT, sc.chat_eos_is_stop, Faults(eos_at=3))


def test_streamed_chat_deltas_finish_reason_and_usage() -> None:
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    st = StreamState(sc.chat_req(1, 5))
    for chunk in (
        '{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}',
        '{"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}',
        '{"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": null}]}',
        '{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}',
        '{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}',
    ):
        adapter.on_event("message", chunk, st)
    assert [json.loads(t) for t in st.texts] == ["Hel", "lo"]
    assert (st.finish, st.prompt_tokens, st.done) == ("stop", 9, False)
    adapter.on_event("message", "[DONE]", st)
    assert st.done and st.finish == "stop"


def test_embeddings_pass_through_in_order_with_usage() -> None:
    bodies = sc.run(CLS, DIALECT, sc.embeddings_pass_through)
    assert bodies[0] == {
        "model": MODEL,
        "input": ["first input", "the second input", "first input", "é 日本 🙂"],
        "encoding_format": "float",
    }


def test_embedding_vectors_are_ordered_by_index() -> None:
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    r = sc.embed_req(1, ["a", "b", "c"])
    answer = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 2, "embedding": [3.0]},
            {"object": "embedding", "index": 0, "embedding": [1, 0.5]},
            {"object": "embedding", "index": 1, "embedding": [2.0]},
        ],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    assert adapter.read_embedding(answer, r) == ([[1.0, 0.5], [2.0], [3.0]], 3)
    assert adapter.read_embedding({**answer, "usage": None}, r)[1] is None
    for broken, why in (
        ({**answer, "data": answer["data"][:2]}, "3 inputs"),
        ({"data": [{"index": 0, "embedding": "nope"}] * 3}, "index and embedding"),
        ({"data": [{"index": i, "embedding": [True]} for i in range(3)]}, "not a list of numbers"),
        ({"error": "x"}, "no data list"),
    ):
        with pytest.raises(StreamFailure, match=why) as info:
            adapter.read_embedding(broken, r)
        assert info.value.code == Code.INTERNAL


def test_embedding_errors_map_like_streams() -> None:
    async def bad_input(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
        a.submit(sc.embed_req(1, []))  # the fake answers 400, as vLLM does
        end = await sink.wait_end(1)
        assert (end.kind, end.reason) == ("error", "INVALID_PARAMS"), end
        assert "400" in end.message and "bad embeddings request" in end.message
        assert sink.usage == {} and sink.vectors == {}

    sc.run(CLS, DIALECT, bad_input)

    async def overloaded(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
        a.submit(sc.embed_req(1, ["x"]))
        end = await sink.wait_end(1)
        assert (end.kind, end.reason, end.retry_after_ms) == ("error", "POOL_UNAVAILABLE", 3000)

    sc.run(CLS, DIALECT, overloaded, Faults(reject_503=1, retry_after="3"))

    async def too_slow(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
        a.submit(sc.embed_req(1, ["x"]))
        end = await sink.wait_end(1, timeout=3.0)
        assert (end.kind, end.reason) == ("error", "DECODE_TIMEOUT"), end
        assert "no embedding" in end.message
        await wait_until(lambda: fake.canceled, 5, "the fake to see the client go")

    sc.run(CLS, DIALECT, too_slow, Faults(first_token_delay_s=3.0), decode_timeout_ms=200)


def test_an_aborted_embedding_reports_nothing() -> None:
    async def abort(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
        a.submit(sc.embed_req(1, ["x"]))
        await wait_until(lambda: fake.seen, 5, "the request at the fake")
        a.abort(1)
        await wait_until(lambda: fake.canceled, 5, "the fake to see the client go")
        a.submit(sc.embed_req(2, ["y"]))
        assert (await sink.wait_end(2, timeout=5)).kind == "embedding"
        assert sink.end_of(1) is None and 1 not in sink.usage

    sc.run(CLS, DIALECT, abort, Faults(first_token_delay_s=0.5))
