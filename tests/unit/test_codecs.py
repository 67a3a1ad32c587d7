"""The OpenAI codec of the supervisor (engine_procs/codecs.py): chunks, whole bodies, usage,
stop strings, errors; and the request parsing of the OpenAI routes."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest

from engine_procs.codecs import OpenAICodec, StopScanner
from engine_procs.runs import Run
from ipc import protocol as p
from ipc.frames import json_string
from orchd.config import Limits
from orchd.core.errors import Code, OrchdError
from orchd.frontend.openai_schema import parse


def spec(api: str = "chat", **kw: Any) -> p.TaskSpec:
    base: dict[str, Any] = {
        "task_id": "chatcmpl-1",
        "session_id": "s",
        "workload": "completion",
        "model_ref": "m",
        "engine": "",
        "ctx": 1,
        "priority": "interactive",
        "max_tokens": 8,
        "deadline_ms": 1000,
        "api": api,
        "model": "m",
        "created": 7,
    }
    return p.TaskSpec(**{**base, **kw})


def run_of(s: p.TaskSpec) -> Run:
    return Run(s.task_id, 1, s, 0.0)


def feed(codec: OpenAICodec, run: Run, *texts: str) -> list[bytes]:
    run.tokens += len(texts)
    return codec.tokens(run, [json_string(t) for t in texts])


def datas(frames: bytes) -> list[str]:
    return [line[6:] for line in frames.decode().split("\n") if line.startswith("data: ")]


# ---------------------------------------------------------------- stop strings


def test_the_scanner_releases_text_up_to_the_stop() -> None:
    sc = StopScanner(["END"])
    assert sc.feed("abc") == "a"  # "bc" could still begin "END"
    assert sc.feed("dE") == "bc"
    assert sc.feed("NDxyz") == "d" and sc.hit  # "END" across two feeds: nothing of it leaks


def test_the_scanner_takes_the_earliest_of_several_stops() -> None:
    sc = StopScanner(["zz", "b"])
    assert sc.feed("aabzz") == "aa" and sc.hit


def test_held_text_comes_out_at_the_end() -> None:
    sc = StopScanner(["xyz"])
    assert sc.feed("hello") == "hel"
    assert sc.flush() == "lo"


# ---------------------------------------------------------------- chunks and bodies


def test_a_chat_stream_is_role_deltas_final_usage_done() -> None:
    s = spec(stream_usage="final")
    codec, run = OpenAICodec(s), run_of(s)
    run.tokens_in = 3
    first = json.loads(datas(codec.started(run))[0])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    frames = feed(codec, run, "Hi", " there\n")
    chunks = [json.loads(datas(f)[0]) for f in frames]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["Hi", " there\n"]
    assert chunks[0]["id"] == "chatcmpl-1" and chunks[0]["created"] == 7
    tail = datas(codec.end(run, "length"))
    final, use, done = json.loads(tail[0]), json.loads(tail[1]), tail[2]
    assert final["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert use["choices"] == [] and use["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }
    assert done == "[DONE]"
    assert run.seq == 4  # ids: role 0, tokens 1-2, final 3, usage 4


def test_continuous_usage_is_on_every_chunk() -> None:
    s = spec(stream_usage="continuous")
    codec, run = OpenAICodec(s), run_of(s)
    assert codec.started(run) == b""  # the role waits for the prompt's count
    run.tokens_in = 5
    role, frame = feed(codec, run, "a")
    assert json.loads(datas(role)[0])["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 0,
        "total_tokens": 5,
    }
    assert json.loads(datas(frame)[0])["usage"]["completion_tokens"] == 1
    # An engine step of three tokens: each chunk counts up to itself.
    counts = [
        json.loads(datas(f)[0])["usage"]["completion_tokens"]
        for f in feed(codec, run, "b", "c", "d")
    ]
    assert counts == [2, 3, 4]


def test_a_whole_chat_response_is_one_body() -> None:
    s = spec(stream=False)
    codec, run = OpenAICodec(s), run_of(s)
    assert codec.started(run) == b""
    assert feed(codec, run, 'say "hi"', "\n") == []
    body = json.loads(codec.end(run, "stop"))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": 'say "hi"\n'}
    assert body["usage"]["completion_tokens"] == 2


def test_a_stop_ends_a_completion_and_cuts_its_text() -> None:
    s = spec("completions", stream=False, stop=["##"])
    codec, run = OpenAICodec(s), run_of(s)
    feed(codec, run, "one #", "# two")
    assert codec.stopped
    body = json.loads(codec.end(run, "stop"))
    assert body["choices"][0]["text"] == "one " and body["choices"][0]["finish_reason"] == "stop"


def test_embeddings_as_floats_or_base64() -> None:
    for fmt in ("float", "base64"):
        s = spec("embeddings", stream=False, workload="embedding", encoding_format=fmt)
        codec, run = OpenAICodec(s), run_of(s)
        run.tokens_in = 4
        codec.vectors = [[0.5, -0.25], [1.0, 0.0]]
        body = json.loads(codec.end(run, "stop"))
        assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
        got = body["data"][0]["embedding"]
        if fmt == "base64":
            got = list(struct.unpack("<2f", base64.b64decode(got)))
        assert got == [0.5, -0.25]


def test_an_error_is_openais_shape_in_a_stream_and_in_a_body() -> None:
    env = OrchdError(Code.WORKER_RESET, "engine died").envelope()
    s = spec()
    frame = OpenAICodec(s).error(run_of(s), env)
    err = json.loads(datas(frame)[0])["error"]
    assert (err["type"], err["code"]) == ("server_error", "WORKER_RESET")
    s = spec(stream=False)
    assert json.loads(OpenAICodec(s).error(run_of(s), env))["error"]["message"] == "engine died"


# ---------------------------------------------------------------- request parsing


LIMITS = Limits(max_tokens_limit=100)


def parsed(api: str = "chat", **body: Any) -> p.TaskSpec:
    base: dict[str, Any] = {"model": "m"}
    if api == "chat":
        base["messages"] = [{"role": "user", "content": "hi"}]
    elif api == "completions":
        base["prompt"] = "hi"
    else:
        base["input"] = "hi"
    return parse(json.dumps({**base, **body}).encode(), api, LIMITS, "key")


def test_a_chat_request_becomes_a_task() -> None:
    t = parsed(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_completion_tokens=9,
        stop="x",
        stream=True,
        stream_options={"include_usage": True},
        priority="batch",
        session_id="s1",
        unknown_field=1,
    )
    assert t.messages == [("system", "be brief"), ("user", "ab")]
    assert (t.max_tokens, t.stop, t.stream, t.stream_usage) == (9, ["x"], True, "final")
    assert (t.priority, t.session_id, t.engine, t.model_ref) == ("batch", "s1", "", "m")
    assert t.task_id.startswith("chatcmpl-") and t.api_key_id == "key"


def test_a_prompt_list_of_one_and_defaults() -> None:
    t = parsed("completions", prompt=["only"])
    assert (t.prompt, t.max_tokens, t.stream, t.session_id) == ("only", 100, False, t.task_id)


@pytest.mark.parametrize(
    ("api", "body", "param"),
    [
        ("chat", {"n": 3}, "n"),
        ("chat", {"max_tokens": 101}, "max_tokens"),
        ("chat", {"temperature": 3}, "temperature"),
        ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("chat", {"messages": []}, "messages"),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
        ),
        ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("chat", {"priority": "urgent"}, "priority"),
        ("completions", {"prompt": ["a", "b"]}, "prompt"),
        ("embeddings", {"input": [1, 2]}, "input"),
        ("embeddings", {"dimensions": 8}, "dimensions"),
        ("chat", {"model": ""}, "model"),
    ],
)
def test_bad_requests_name_their_field(api: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(OrchdError) as e:
        parsed(api, **body)
    assert e.value.code is Code.INVALID_PARAMS and e.value.param == param
    assert e.value.openai()["error"]["param"] == param
