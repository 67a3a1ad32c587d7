"""The bench's OpenAI stream reading: content deltas counted without parsing JSON, exactly
once however the stream is cut into reads, in the read that brings their first character."""

from __future__ import annotations

import asyncio
import json

import pytest

from perf.http import Conn, DeltaCounter, StreamRec


def _chunk(content: str | None, *, spaced: bool = False, role: bool = False) -> bytes:
    delta: dict[str, str | None] = {"role": "assistant"} if role else {}
    if content is not None or role:
        delta["content"] = content
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    sep = (", ", ": ") if spaced else (",", ":")
    return b"data: " + json.dumps(body, separators=sep).encode() + b"\n\n"


TEXTS = ["Hi", '"', "\\", "é", " 日本", '"content":"x"', "", "\n", " w"]


def _stream(spaced: bool) -> tuple[bytes, list[int]]:
    """A whole stream and, per non-empty delta, the offset of its first content byte."""
    out = _chunk("", spaced=spaced, role=True)
    firsts = []
    for text in TEXTS:
        c = _chunk(text, spaced=spaced)
        if text:
            key = b'"content": "' if spaced else b'"content":"'
            firsts.append(len(out) + c.index(key) + len(key))
        out += c
    out += _chunk(None, spaced=spaced) + b"data: [DONE]\n\n"
    return out, firsts


NONEMPTY = sum(1 for t in TEXTS if t)


@pytest.mark.parametrize("spaced", [False, True])
def test_whole_stream_in_one_read(spaced: bool) -> None:
    data, _ = _stream(spaced)
    assert DeltaCounter().feed(data) == NONEMPTY


@pytest.mark.parametrize("spaced", [False, True])
def test_every_two_way_cut_counts_each_delta_once_where_it_starts(spaced: bool) -> None:
    data, firsts = _stream(spaced)
    for cut in range(1, len(data)):
        c = DeltaCounter()
        a, b = c.feed(data[:cut]), c.feed(data[cut:])
        assert (a, b) == (sum(f < cut for f in firsts), sum(f >= cut for f in firsts)), cut


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 13])
def test_small_reads(size: int) -> None:
    data, firsts = _stream(False)
    c = DeltaCounter()
    got = [c.feed(data[i : i + size]) for i in range(0, len(data), size)]
    want = [sum(i <= f < i + size for f in firsts) for i in range(0, len(data), size)]
    assert got == want


def test_completions_text_key_and_escapes() -> None:
    c = DeltaCounter(b"text")
    frames = (
        b'data: {"choices":[{"text":"\\"text\\":\\"a"}]}\n\ndata: {"choices":[{"text":""}]}\n\n'
    )
    assert c.feed(frames) == 1


def _feed_conn(reads: list[bytes]) -> StreamRec:
    async def go() -> StreamRec:
        conn = Conn()
        rec = StreamRec(deltas=DeltaCounter())
        conn._fut = asyncio.get_running_loop().create_future()
        conn._rec = rec
        for r in reads:
            conn.data_received(r)
        return rec

    return asyncio.run(go())


def _chunked(body: bytes) -> bytes:
    """One HTTP chunk per SSE frame, as servers write them (the counter assumes no chunk
    header inside a frame)."""
    out = b""
    for frame in body.split(b"\n\n")[:-1]:
        part = frame + b"\n\n"
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def test_conn_reads_an_openai_stream_to_done() -> None:
    data, _ = _stream(False)
    wire = HEAD + _chunked(data)
    rec = _feed_conn([wire[i : i + 64] for i in range(0, len(wire), 64)])
    assert rec.tokens == NONEMPTY and rec.oa_done and rec.done and not rec.errors


def test_conn_sees_an_error_frame() -> None:
    body = _chunk("a") + b'data: {"error":{"message":"boom","code":"internal_error"}}\n\n'
    rec = _feed_conn([HEAD + _chunked(body)])
    assert rec.tokens == 1 and rec.errors == 1 and not rec.oa_done and rec.done
    assert b"boom" in rec.error_text


def test_per_core_divides_by_the_named_roles_cpu() -> None:
    from perf.oa_scenario import per_core

    run = {
        "token_events_per_s": 1000.0,
        "server_cpu_pct_by_role": {"litellm": 40.0, "upstream": 8.0, "engine0": 2.0},
    }
    assert per_core(run) == pytest.approx(2000.0)
    assert per_core(run, ("litellm",)) == pytest.approx(2500.0)
    assert per_core({"token_events_per_s": 5.0, "server_cpu_pct_by_role": {}}) == 0.0


def test_litellm_config_routes_the_model_to_the_upstream() -> None:
    from perf.litellm import config_yaml

    cfg = json.loads(config_yaml("mock:tiny", "http://127.0.0.1:9/v1"))  # JSON is YAML
    (entry,) = cfg["model_list"]
    assert entry["model_name"] == "mock:tiny"
    assert entry["litellm_params"]["model"] == "openai/mock:tiny"
    assert entry["litellm_params"]["api_base"] == "http://127.0.0.1:9/v1"
