"""The Triton adapter against a fake Triton server (generate extension, v2 readiness)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine_procs.adapters.http_base import HttpAdapter, StreamState
from engine_procs.adapters.triton import TritonAdapter
from orchd.config import Endpoint, Replica
from tests.fakes import scenarios as sc
from tests.fakes.engines import FakeEngine, Faults
from tests.fakes.sink import RecordingSink

CLS, DIALECT = TritonAdapter, "triton"


def test_streams_seeded_tokens_and_passes_parameters() -> None:
    bodies = sc.run(CLS, DIALECT, sc.completes)
    first = next(b for b in bodies if b["parameters"]["max_tokens"] == 8)
    assert first == {
        "text_input": "say hi",
        "parameters": {"stream": True, "max_tokens": 8, "random_seed": 7},
    }


def test_prompt_tokens_only_from_a_model_that_returns_them() -> None:
    # The fake, like Triton, sends no prompt length unless asked (the scenarios check that
    # none is reported); a model that returns num_input_tokens has it reported.
    adapter, _ = sc.adapter_for(CLS, "http://127.0.0.1:1")
    head = '{"model_name": "m", "model_version": "1", "text_output": "a"'
    for extra, want in (
        ("", None),
        (', "num_input_tokens": 7', 7),
        (', "num_input_tokens": [7]', 7),
    ):
        st = StreamState(sc.req(1, 4))
        adapter.on_event("message", head + extra + "}", st)
        assert st.prompt_tokens == want, extra


def test_reads_server_version() -> None:
    async def look(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> dict[str, Any]:
        return {"v": a.engine_version, "ctx": a.ctx_max, "slots": a.slots}

    assert sc.run(CLS, DIALECT, look) == {"v": "fake-1.2.3", "ctx": None, "slots": None}


def test_needs_a_model_name() -> None:
    adapter = CLS(Replica(id="r0", endpoint=Endpoint(url="http://x")), "", RecordingSink())
    with pytest.raises(RuntimeError, match="endpoint.model"):
        asyncio.run(adapter.start(1.0))


def test_short_stream_ends_with_stop() -> None:
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
    sc.run(CLS, DIALECT, sc.overloaded_503, Faults(reject_503=1, retry_after="2"))


def test_cancel_reaches_the_server() -> None:
    sc.run(CLS, DIALECT, sc.cancel_reaches_server, Faults(token_delay_s=0.01))


def test_connection_refused_is_worker_reset_and_engine_dead() -> None:
    sc.connection_refused(CLS)


def test_start_waits_for_readiness_and_gives_up_with_a_reason() -> None:
    sc.not_ready_in_time(CLS)


def test_a_chat_is_refused_naming_triton() -> None:
    assert not CLS.chat and not CLS.embeddings
    sc.run(CLS, DIALECT, sc.chat_refused)


def test_embeddings_are_refused() -> None:
    sc.run(CLS, DIALECT, sc.embeddings_refused)
