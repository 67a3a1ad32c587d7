"""The OpenAI-compatible routes, driven by the official `openai` client (unmodified) against a
real orchd, and their raw bytes held to contracts/openapi/openai.yaml."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from engine_procs.mock_engine import prompt_tokens
from tests.integration.conftest import metric
from tests.support import openai_contract as oc
from tests.support.daemon import Daemon
from tests.support.sse import sync_request
from tests.support.wait import wait_for

MODEL = "mock:tiny"
HI = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("openai")) as d:
        yield d


@pytest.fixture
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="dev", max_retries=0)
    yield c
    c.close()


def chat_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """What the mock engine counts for a chat: its documented template, rendered."""
    from engine_procs.mock_engine import render_chat

    return prompt_tokens(render_chat([(m["role"], m["content"]) for m in messages]))


# ---------------------------------------------------------------- models


def test_models_list_and_retrieve(client: openai.OpenAI, daemon: Daemon) -> None:
    models = client.models.list()
    assert [m.id for m in models] == [MODEL]
    m = client.models.retrieve(MODEL)
    assert (m.id, m.object, m.owned_by) == (MODEL, "model", "orchd") and m.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    oc.check_response("/v1/models", *oc.get(daemon.port, "/v1/models"))
    oc.check_response("/v1/models/{model}", *oc.get(daemon.port, f"/v1/models/{MODEL}"))
    oc.check_response("/v1/models/{model}", *oc.get(daemon.port, "/v1/models/nope"))


# ---------------------------------------------------------------- chat


def test_chat_whole_response(client: openai.OpenAI, daemon: Daemon) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, seed=3)
    (choice,) = r.choices
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (chat_prompt_tokens(HI), 6)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    # The same seed, the same words.
    again = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, seed=3)
    assert again.choices[0].message.content == choice.message.content
    status, raw = oc.post(daemon.port, "/v1/chat/completions", {"model": MODEL, "messages": HI})
    oc.check_response("/v1/chat/completions", status, raw)


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HI,
            max_tokens=5,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (chat_prompt_tokens(HI), 5)
    # Streamed or not, the same seed gives the same text.
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, seed=3)
    assert whole.choices[0].message.content == text


def test_chat_stream_frames_follow_the_contract(daemon: Daemon) -> None:
    body = {
        "model": MODEL,
        "messages": HI,
        "max_tokens": 4,
        "stream_options": {"continuous_usage_stats": True},
    }
    frames = list(oc.stream_frames(daemon.port, "/v1/chat/completions", body))
    assert frames[-1] == (-1, "[DONE]")
    ids = [i for i, _ in frames[:-1]]
    assert ids == list(range(len(ids)))  # every frame carries its event id, in order
    for _, data in frames[:-1]:
        chunk = json.loads(data)
        if chunk["choices"]:
            oc.check("ChatChunk", chunk)
        assert chunk["usage"]["prompt_tokens"] == chat_prompt_tokens(HI)  # on every chunk
    counts = [json.loads(d)["usage"]["completion_tokens"] for _, d in frames[1:5]]
    assert counts == [1, 2, 3, 4]


# ---------------------------------------------------------------- completions


def test_completion_whole_and_streamed(client: openai.OpenAI, daemon: Daemon) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=7, seed=11)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens("Once upon"), 7)
    parts = client.completions.create(
        model=MODEL, prompt=["Once upon"], max_tokens=7, seed=11, stream=True
    )
    assert "".join(c.choices[0].text for c in parts) == r.choices[0].text
    for _, data in oc.stream_frames(
        daemon.port, "/v1/completions", {"model": MODEL, "prompt": "x"}
    ):
        if data != "[DONE]":
            oc.check("Completion", json.loads(data))


def test_stop_strings_are_honoured(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="stop me", max_tokens=40, seed=5)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    cut = client.completions.create(model=MODEL, prompt="stop me", max_tokens=40, seed=5, stop=stop)
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt="stop me", max_tokens=40, seed=5, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


# ---------------------------------------------------------------- embeddings


def test_embeddings(client: openai.OpenAI, daemon: Daemon) -> None:
    r = client.embeddings.create(model=MODEL, input=["alpha beta", "gamma"])
    assert [d.index for d in r.data] == [0, 1]
    a, b = (d.embedding for d in r.data)
    assert len(a) == len(b) > 0 and a != b
    assert abs(sum(x * x for x in a) - 1.0) < 1e-3  # unit norm
    assert r.usage.prompt_tokens == prompt_tokens("alpha beta") + prompt_tokens("gamma")
    again = client.embeddings.create(model=MODEL, input="gamma", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(b, rel=1e-6)
    status, raw = oc.post(daemon.port, "/v1/embeddings", {"model": MODEL, "input": "x"})
    oc.check_response("/v1/embeddings", status, raw)


def test_native_embedding_workload(daemon: Daemon) -> None:
    from tests.integration.conftest import run_task

    s = run_task(daemon, workload="embedding", inputs=["gamma"], prompt=None)
    kinds = [e.event for e in s.events]
    assert kinds == ["started", "embedding", "end"]
    (vector,) = s.events[1].json["vectors"]
    assert len(vector) > 0


# ---------------------------------------------------------------- orchd's own fields


def test_priority_and_session_ride_as_extra_body(client: openai.OpenAI, daemon: Daemon) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=3,
        extra_body={"priority": "batch", "session_id": "oa-sess"},
    )
    daemon.wait_log(
        lambda rec: (
            rec.get("narration") == "admitted"
            and rec.get("task_id", "").endswith("/" + r.id)  # (scoped by its key)
            and rec.get("priority") == "batch"
        ),
        10,
    )
    status, _, raw = sync_request(
        daemon.host, daemon.port, "GET", "/v1/sessions/oa-sess", daemon.headers
    )
    assert status == 200 and json.loads(raw)["turns"] == 1


def test_a_disconnect_cancels_the_task_after_the_grace(daemon: Daemon) -> None:
    before = metric(daemon, "tasks_canceled_total", '{reason="client_disconnect"}')
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="dev", max_retries=0)
    with c.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=20_000, stream=True
    ) as stream:
        for n, _ in enumerate(stream):
            if n == 3:
                break
    c.close()
    wait_for(  # once limits.resume_grace_ms (10 s) passed with no resume
        lambda: metric(daemon, "tasks_canceled_total", '{reason="client_disconnect"}') > before,
        30,
        "the canceled task counted",
    )


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_what_orchd_cannot_do_is_a_400_naming_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": HI, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    assert e.value.param == param
    assert isinstance(e.value.body, dict) and e.value.body["type"] == "invalid_request_error"


def test_auth_and_unknown_model_errors(daemon: Daemon, client: openai.OpenAI) -> None:
    url = f"http://127.0.0.1:{daemon.port}/v1"
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    status, raw = oc.post(daemon.port, "/v1/chat/completions", {"model": MODEL}, key="")
    assert status in (401, 403)
    oc.check_response("/v1/chat/completions", status, raw)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HI)
    assert e.value.param == "model"


TIGHT = """
[limits]
queue_capacity = 1

[[replicas]]
id = "r0"
slots = 1
[replicas.mock]
itl_ms = 20
"""


def test_full_queue_is_429_and_drained_pool_503(tmp_path: Path) -> None:
    with Daemon(tmp_path, TIGHT) as d:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="dev", max_retries=0)
        running = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=5000, stream=True)
        next(iter(running))  # it holds the only slot
        queued = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, stream=True)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=MODEL, messages=HI, max_tokens=5)
        assert e.value.response.headers.get("retry-after")
        running.close()
        queued.close()
        status, _, _ = sync_request(
            d.host, d.port, "POST", "/v1/pools/default/drain", d.headers, {"deadline_ms": 0}
        )
        assert status == 202
        with pytest.raises(openai.InternalServerError) as e5:
            c.chat.completions.create(model=MODEL, messages=HI, max_tokens=5)
        assert e5.value.status_code == 503 and e5.value.response.headers.get("retry-after")
        c.close()
