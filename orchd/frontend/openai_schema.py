"""The OpenAI-compatible request bodies, validated into orchd tasks.

What is read: ``model``; ``messages`` (roles system, developer, user, assistant; string
content or text parts) or ``prompt`` (a string, or a list of one string); ``max_tokens`` /
``max_completion_tokens``; ``temperature``, ``top_p``, ``seed``; ``stop`` (a string or up to
four); ``n`` (1 only); ``user`` (accepted); ``stream`` and ``stream_options``
(``include_usage``, ``continuous_usage_stats``, as vLLM reads them). orchd's own fields ride
along as extra body fields, the way vLLM takes ``priority``: ``priority``, ``session_id``,
``deadline_ms``, ``placement``. Embeddings read ``input`` (a string or a list of strings)
and ``encoding_format`` (``float`` or ``base64``).

Whatever orchd cannot do is a 400 naming the field (``n`` above 1, ``logprobs``, ``tools``,
``response_format`` other than text, ...), never silently ignored. Fields nobody knows are
ignored, as OpenAI's servers do.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

from ipc.protocol import TaskSpec
from orchd.config import Limits
from orchd.core.errors import Code, OrchdError
from orchd.frontend.schema import Placement

DEFAULT_MAX_TOKENS = 256
DEFAULT_DEADLINE_MS = 600_000
MAX_STOPS = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ID_PREFIX = {"chat": "chatcmpl-", "completions": "cmpl-", "embeddings": "embd-"}

# Fields orchd refuses unless they ask for nothing (their value is falsy or the default).
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "best_of",
    "echo",
    "suffix",
    "audio",
    "modalities",
    "prediction",
    "parallel_tool_calls",
)


def bad(param: str, why: str) -> OrchdError:
    return OrchdError(Code.INVALID_PARAMS, f"{param}: {why}", param=param)


def _decode(body: bytes) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(body or b"null")
    except msgspec.DecodeError as e:
        raise OrchdError(Code.INVALID_PARAMS, f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise OrchdError(Code.INVALID_PARAMS, "body must be a JSON object")
    return obj


def _int(b: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = b.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise bad(name, f"must be an integer from {lo} to {hi}")
    return v


def _float(
    b: dict[str, Any], name: str, lo: float, hi: float, *, open_lo: bool = False
) -> float | None:
    v = b.get(name)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise bad(name, "must be a number")
    if v > hi or v < lo or (open_lo and v == lo):
        raise bad(name, f"must be in {'(' if open_lo else '['}{lo}, {hi}]")
    return float(v)


def _str(b: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    v = b.get(name)
    if v is None:
        if required:
            raise bad(name, "is required")
        return None
    if not isinstance(v, str) or not v:
        raise bad(name, "must be a non-empty string")
    return v


def _refuse_unsupported(b: dict[str, Any]) -> None:
    for name in UNSUPPORTED:
        v = b.get(name)
        if v not in (None, False, 0, 0.0, [], {}):
            raise bad(name, "is not supported by orchd's engines; leave it out")
    n = b.get("n")
    if n is not None and n != 1:
        raise bad("n", "only n=1 is supported; send one request per completion")
    fmt = b.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format", "only {'type': 'text'} is supported")


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad(f"messages[{i}].content[{j}]", "only text parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"messages[{i}].content[{j}].text", "must be a string")
            parts.append(text)
        return "".join(parts)
    raise bad(f"messages[{i}].content", "must be a string or a list of text parts")


def _messages(b: dict[str, Any]) -> list[tuple[str, str]]:
    msgs = b.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "must be an object")
        role = ROLES.get(m.get("role", ""))
        if role is None:
            raise bad(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        out.append((role, _content(i, m.get("content"))))
    return out


def _prompt(b: dict[str, Any], limit: int) -> str:
    v = b.get("prompt")
    if isinstance(v, list):
        if len(v) != 1 or not isinstance(v[0], str):
            raise bad("prompt", "a list must hold exactly one string; send one request per prompt")
        v = v[0]
    if not isinstance(v, str):
        raise bad("prompt", "must be a string")
    if len(v) > limit:
        raise bad("prompt", f"is longer than {limit} characters")
    return v


def _stop(b: dict[str, Any]) -> list[str] | None:
    v = b.get("stop")
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "must be a non-empty string or a list of them")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} stop strings")
    return stops or None


def _stream_usage(b: dict[str, Any], stream: bool) -> str:
    opts = b.get("stream_options")
    if opts is None:
        return ""
    if not isinstance(opts, dict):
        raise bad("stream_options", "must be an object")
    if not stream:
        raise bad("stream_options", "is only allowed when stream is true")
    if opts.get("continuous_usage_stats"):
        return "continuous"
    return "final" if opts.get("include_usage") else ""


def _extras(b: dict[str, Any], spec: dict[str, Any]) -> None:
    """orchd's own fields, given as extra body fields."""
    priority = b.get("priority", "interactive")
    if priority not in ("interactive", "batch"):
        raise bad("priority", "must be interactive or batch")
    spec["priority"] = priority
    if "session_id" in b:
        spec["session_id"] = _str(b, "session_id")
    deadline = _int(b, "deadline_ms", 1, 2**53)
    spec["deadline_ms"] = deadline or DEFAULT_DEADLINE_MS
    if b.get("placement") is not None:
        try:
            placement = msgspec.convert(b["placement"], Placement)
        except msgspec.ValidationError as e:
            raise bad("placement", str(e)) from None
        spec["placement"] = msgspec.to_builtins(placement)


def _task_id(api: str) -> str:
    return ID_PREFIX[api] + os.urandom(12).hex()


def parse(body: bytes, api: str, limits: Limits, api_key_id: str) -> TaskSpec:
    """``api`` is "chat", "completions" or "embeddings"."""
    b = _decode(body)
    model = _str(b, "model", required=True)
    assert model is not None
    _refuse_unsupported(b)
    task_id = _task_id(api)
    spec: dict[str, Any] = {
        "task_id": task_id,
        "session_id": task_id,
        "model_ref": model,
        "model": model,
        "engine": "",
        "ctx": limits.ctx_limit,
        "api": api,
        "api_key_id": api_key_id,
        "created": int(time.time()),
    }
    _extras(b, spec)
    if b.get("user") is not None and not isinstance(b["user"], str):
        raise bad("user", "must be a string")
    if api == "embeddings":
        return _embeddings(b, spec)
    stream = b.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "must be true or false")
    max_tokens = _int(b, "max_completion_tokens", 1, limits.max_tokens_limit)
    if max_tokens is None:
        max_tokens = _int(b, "max_tokens", 1, limits.max_tokens_limit)
    spec.update(
        workload="completion",
        stream=stream,
        stream_usage=_stream_usage(b, stream),
        max_tokens=max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_tokens_limit),
        temperature=_float(b, "temperature", 0.0, 2.0),
        top_p=_float(b, "top_p", 0.0, 1.0, open_lo=True),
        seed=_int(b, "seed", 0, 2**63 - 1),
        stop=_stop(b),
    )
    if api == "chat":
        spec.update(messages=_messages(b), prompt="")
    else:
        spec["prompt"] = _prompt(b, limits.max_body_bytes)
    return TaskSpec(**spec)


def _embeddings(b: dict[str, Any], spec: dict[str, Any]) -> TaskSpec:
    inp = b.get("input")
    inputs = [inp] if isinstance(inp, str) else inp
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
        raise bad("input", "must be a string or a non-empty list of strings (token arrays: no)")
    fmt = b.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad("encoding_format", "must be float or base64")
    if b.get("dimensions") is not None:
        raise bad("dimensions", "is not supported: the model's own dimension is returned")
    spec.update(
        workload="embedding",
        stream=False,
        max_tokens=1,
        inputs=inputs,
        encoding_format=fmt,
        seed=_int(b, "seed", 0, 2**63 - 1),
    )
    return TaskSpec(**spec)
