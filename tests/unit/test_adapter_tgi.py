"""The TGI adapter against a fake text-generation-inference server (/generate_stream; chats on
the Messages API, /v1/chat/completions)."""

from __future__ import annotations

from typing import Any

from engine_procs.adapters.base import EngineRequest
from engine_procs.adapters.http_base import HttpAdapter, StreamState
from engine_procs.adapters.tgi import TgiAdapter
from tests.fakes import scenarios as sc
from tests.fakes.engines import MODEL, FakeEngine, Faults
from tests.fakes.sink import RecordingSink

CLS, DIALECT = TgiAdapter, "tgi"


def test_streams_seeded_tokens_and_passes_parameters() -> None:
    bodies = sc.run(CLS, DIALECT, sc.completes)
    first = next(b for b in bodies if b["parameters"]["max_new_tokens"] == 8)
    assert first == {
        "inputs": "say hi",
        "parameters": {"max_new_tokens": 8, "seed": 7, "details": True},
    }


def test_sampling_parameters_switch_sampling_on() -> None:
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    _, body = adapter.request(EngineRequest(1, "p", 0, 4, temperature=0.7, top_p=0.9))
    assert body["parameters"] == {
        "max_new_tokens": 4,
        "seed": 1,  # TGI rejects seed 0
        "details": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "do_sample": True,
    }
    _, greedy = adapter.request(EngineRequest(1, "p", 5, 4, temperature=0.0))
    assert "temperature" not in greedy["parameters"]  # TGI rejects temperature 0


def test_prompt_tokens_come_from_the_last_events_details() -> None:
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    token = '"token": {"id": 1, "text": "a", "logprob": -1.0, "special": false}'

    def read(end: str) -> StreamState:
        st = StreamState(sc.req(1, 2))
        adapter.on_event("message", f'{{{token}, "generated_text": null, "details": null}}', st)
        assert st.prompt_tokens is None
        adapter.on_event("message", f'{{{token}, "generated_text": "aa", {end}}}', st)
        assert st.done and st.finish == "length"
        return st

    details = '"finish_reason": "length", "generated_tokens": 2, "seed": null'
    assert read(f'"details": {{{details}, "input_length": 12}}').prompt_tokens == 12
    assert read(f'"details": {{{details}}}').prompt_tokens is None  # a TGI before input_length


def test_reads_version_context_and_slots_from_info() -> None:
    async def look(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> dict[str, Any]:
        return {"v": a.engine_version, "ctx": a.ctx_max, "slots": a.slots, "model": a.model}

    got = sc.run(CLS, DIALECT, look)
    assert got == {"v": "fake-1.2.3", "ctx": 4096, "slots": 4, "model": MODEL}


def test_eos_token_ends_with_stop_and_is_not_text() -> None:
    sc.run(CLS, DIALECT, sc.eos_is_stop, Faults(eos_at=3))


def test_mid_stream_disconnect_is_worker_reset() -> None:
    sc.run(CLS, DIALECT, sc.disconnect_is_worker_reset, Faults(disconnect_after=3))


def test_malformed_chunk_is_internal_and_hangs_up() -> None:
    sc.run(CLS, DIALECT, sc.malformed_is_internal, Faults(malformed_after=2, token_delay_s=0.01))


def test_error_event_is_internal() -> None:
    sc.run(CLS, DIALECT, sc.engine_error_is_internal, Faults(error_after=2))


def test_slow_first_token_within_timeout_completes() -> None:
    sc.run(CLS, DIALECT, sc.slow_first_token_ok, Faults(first_token_delay_s=0.3))


def test_no_first_token_is_decode_timeout() -> None:
    faults = Faults(first_token_delay_s=3.0)
    sc.run(CLS, DIALECT, sc.no_token_is_decode_timeout, faults, decode_timeout_ms=200)


def test_503_passes_retry_after() -> None:
    sc.run(CLS, DIALECT, sc.overloaded_503, Faults(reject_503=1, retry_after="1"))


def test_cancel_reaches_the_server() -> None:
    sc.run(CLS, DIALECT, sc.cancel_reaches_server, Faults(token_delay_s=0.01))


def test_connection_refused_is_worker_reset_and_engine_dead() -> None:
    sc.connection_refused(CLS)


def test_start_waits_for_health_and_gives_up_with_a_reason() -> None:
    sc.not_ready_in_time(CLS)


def test_chats_go_to_the_messages_api_and_stop_strings_everywhere() -> None:
    seen = sc.run(CLS, DIALECT, sc.chat_completes)
    assert [seen[rid].path for rid in (1, 2, 3)] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/generate_stream",
    ]
    assert seen[1].body == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": 'say "hi"'},
        ],
        "max_tokens": 8,
        "seed": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert seen[2].body["stop"] == ["\n\n", "END"]
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    native = EngineRequest(4, "p", 0, 4, stop=["###"])
    assert adapter.request(native)[1]["parameters"]["stop"] == ["###"]


def test_chat_sampling_parameters() -> None:
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    chat = [("user", "x")]
    _, greedy = adapter.request(EngineRequest(1, "", 0, 4, temperature=0.0, messages=chat))
    assert greedy["temperature"] == 0.0  # the Messages API reads 0 as greedy
    assert greedy["seed"] == 1  # TGI rejects seed 0
    _, sampled = adapter.request(EngineRequest(1, "", 5, 4, 0.7, 1.0, messages=chat))
    assert sampled["temperature"] == 0.7 and "top_p" not in sampled  # TGI wants top_p < 1


def test_chat_eos_is_stop_and_not_text() -> None:
    sc.run(CLS, DIALECT, sc.chat_eos_is_stop, Faults(eos_at=3))


def test_chat_finish_reasons() -> None:
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    for reason, want in (("length", "length"), ("stop", "stop"), ("stop_sequence", "stop")):
        st = StreamState(sc.chat_req(1, 4))
        delta = '{"role": "assistant", "content": "a"}'
        chunk = f'{{"choices": [{{"index": 0, "delta": {delta}, "finish_reason": "{reason}"}}]}}'
        adapter.on_event("message", chunk, st)
        assert st.finish == want and st.tokens == 1


def test_chat_error_in_the_stream_is_internal() -> None:
    async def chat_error(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
        a.submit(sc.chat_req(1, 8))
        end = await sink.wait_end(1)
        assert (end.kind, end.reason) == ("error", "INTERNAL"), end
        assert "fault injected" in end.message and len(sink.tokens[1]) == 2

    sc.run(CLS, DIALECT, chat_error, Faults(error_after=2))


def test_embeddings_are_refused() -> None:
    sc.run(CLS, DIALECT, sc.embeddings_refused)
