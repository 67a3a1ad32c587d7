"""What every HTTP engine adapter shares: one streaming task per request, SSE parsing, failure
mapping to the taxonomy, readiness polling, and (optionally) the engine process itself.

Chats (``EngineRequest.messages``) go to dialects whose ``chat`` is True (the others refuse
them with ``INVALID_PARAMS`` naming the adapter); most engines stream them in OpenAI's chunk
shape, read by :func:`openai_chunk`. Embeddings (``workload = "embedding"``) are one plain
JSON request and answer (:meth:`HttpAdapter.embed_request` / ``read_embedding``), reported with
``on_usage`` then ``on_embedding``; only dialects whose ``embeddings`` is True implement them.

A dialect subclass says how to build a request, how to read one SSE event (its text, its end,
and the prompt's length where the engine tells it: ``StreamState.prompt_tokens``, reported to
the sink's ``on_usage`` once, before the request's end), how to probe readiness and what the
engine tells about itself; everything else is here so that the four dialects fail, cancel and
time out the same way. Per request the rule is: exactly one of ``on_finish`` / ``on_error`` /
``on_embedding`` reaches the sink, or nothing at all once ``abort`` was called.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import email.utils
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from engine_procs.adapters.base import EngineAdapter, EngineRequest, EngineSink
from engine_procs.engine_process import EngineProcess, free_port, render_command
from ipc.frames import json_string
from orchd.config import Replica
from orchd.core.errors import Code

READY_POLL_MAX_S = 0.5
ERROR_BODY_LIMIT = 2048
U32_RANDOM = 0xFFFF_FFFF  # llama.cpp reads this seed as "pick a random one"

_decode = msgspec.json.Decoder()


class StreamFailure(Exception):
    """A request failed in a way the taxonomy names; raised inside a dialect's parser."""

    def __init__(self, code: Code, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


def malformed(what: str, data: str) -> StreamFailure:
    return StreamFailure(Code.INTERNAL, f"malformed engine chunk ({what}): {data[:200]!r}")


def parse_json(data: str) -> Any:
    try:
        return _decode.decode(data)
    except msgspec.DecodeError:
        raise malformed("not JSON", data) from None


@dataclass(slots=True)
class StreamState:
    """One request's progress, filled in by the dialect's ``on_event``."""

    req: EngineRequest
    texts: list[bytes] = field(default_factory=list)  # JSON-encoded, not yet handed over
    tokens: int = 0
    finish: str | None = None  # "length" | "stop" once the engine says so
    done: bool = False  # the engine ended the stream (no more events will matter)
    prompt_tokens: int | None = None  # the prompt's length, once the engine says it
    usage_sent: bool = False  # prompt_tokens went to the sink

    def emit(self, text: str) -> None:
        if text:
            self.texts.append(json_string(text))
            self.tokens += 1

    def length_or_stop(self) -> str:
        return "length" if self.tokens >= self.req.max_tokens else "stop"


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) per SSE event. Comments (``:``) are skipped; llama.cpp's
    non-standard ``error: {...}`` line is reported as an ``error`` event."""
    name, buf = "message", list[str]()
    async for line in lines:
        if not line:
            if buf:
                yield name, "\n".join(buf)
            name, buf = "message", []
            continue
        if line[0] == ":":
            continue
        key, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if key == "data":
            buf.append(value)
        elif key == "event":
            name = value
        elif key == "error":
            name = "error"
            buf.append(value)
    if buf:
        yield name, "\n".join(buf)


def retry_after_ms(value: str | None) -> int | None:
    """``Retry-After`` as milliseconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0, int((when - time.time()) * 1000))


def error_message(body: bytes) -> str:
    """The engine's own words from an error body (every dialect has an ``error`` field)."""
    text = body[:ERROR_BODY_LIMIT].decode(errors="replace")
    try:
        obj = _decode.decode(body)
    except msgspec.DecodeError:
        return text
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("message", text))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)
    return text


def status_failure(status: int, body: bytes, headers: httpx.Headers) -> StreamFailure:
    msg = f"engine answered HTTP {status}: {error_message(body)}"
    if status in (429, 503):
        return StreamFailure(Code.POOL_UNAVAILABLE, msg, retry_after_ms(headers.get("retry-after")))
    if status in (400, 413, 422):
        return StreamFailure(Code.INVALID_PARAMS, msg)
    return StreamFailure(Code.INTERNAL, msg)


def chat_messages(req: EngineRequest) -> list[dict[str, str]]:
    """The request's chat in OpenAI's ``messages`` shape."""
    return [{"role": role, "content": content} for role, content in req.messages or []]


def openai_chunk(name: str, data: str, st: StreamState) -> None:
    """One event of an OpenAI-shaped stream (completions or chat completions): each chunk's
    ``choices[0].text`` or ``choices[0].delta.content`` is the next piece, ``finish_reason``
    (``"length"``; anything else, e.g. ``"stop"``, ``"eos_token"``, is a stop) ends it, a
    chunk's ``usage`` (with ``stream_options.include_usage``: a last chunk with
    ``"choices": []``) gives the prompt's length, and ``data: [DONE]`` closes the stream. An
    error is an ``error`` event or a chunk ``{"error": ...}``."""
    if data == "[DONE]":
        if st.finish is None:
            st.finish = st.length_or_stop()
        st.done = True
        return
    if name == "error":
        raise engine_error(data)
    obj = parse_json(data)
    if not isinstance(obj, dict):
        raise malformed("not an object", data)
    if obj.get("error") is not None:
        raise engine_error(data)
    usage = obj.get("usage")
    if isinstance(usage, dict) and st.prompt_tokens is None:
        st.prompt_tokens = as_count(usage.get("prompt_tokens"))
    choices = obj.get("choices")
    if not isinstance(choices, list):
        raise malformed("no choices", data)
    for choice in choices:  # empty on a usage-only chunk
        if not isinstance(choice, dict):
            raise malformed("choice is not an object", data)
        if "delta" in choice:
            delta = choice["delta"]
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = choice.get("text")
        if text is not None and not isinstance(text, str):
            raise malformed("text is not a string", data)
        st.emit(text or "")
        reason = choice.get("finish_reason")
        if reason is not None:
            st.finish = "length" if reason == "length" else "stop"


class HttpAdapter(EngineAdapter, abc.ABC):
    """Base of the HTTP dialects. Subclasses implement the four abstract methods."""

    def __init__(self, replica: Replica, engine_addr: str, sink: EngineSink) -> None:
        super().__init__(replica, engine_addr, sink)
        self.engine_version = "unknown"
        self.ctx_max: int | None = None
        self.slots: int | None = None
        self.model = replica.endpoint.model
        self.base_url = ""
        self.client: httpx.AsyncClient | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}  # live requests, by rid
        self._all: set[asyncio.Task[None]] = set()  # every request task not yet finished
        self._proc: EngineProcess | None = None
        self._watch: asyncio.Task[None] | None = None
        self._resume = asyncio.Event()
        self._resume.set()
        self._dead_reported = False
        self._stopping = False

    # ---------------------------------------------------------------- dialect

    @abc.abstractmethod
    def request(self, req: EngineRequest) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) of the streaming generation request."""

    @abc.abstractmethod
    def on_event(self, name: str, data: str, st: StreamState) -> None:
        """Read one SSE event into ``st``; raise :class:`StreamFailure` on an engine error
        or a malformed chunk."""

    @abc.abstractmethod
    async def probe(self, client: httpx.AsyncClient) -> bool:
        """True once the engine serves requests (False while loading)."""

    @abc.abstractmethod
    async def describe(self, client: httpx.AsyncClient) -> None:
        """Fill in ``engine_version``, ``ctx_max``, ``slots``, ``model`` where exposed."""

    def embed_request(self, req: EngineRequest) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) of an embedding request; only where ``embeddings`` is True."""
        raise StreamFailure(
            Code.INVALID_PARAMS, f"the {self.name} engine adapter does not serve embeddings"
        )

    def read_embedding(self, obj: Any, req: EngineRequest) -> tuple[list[list[float]], int | None]:
        """The vectors (one per input, in order) and the tokens read, from the answer's JSON;
        raise :class:`StreamFailure` when it is not what the engine's API says."""
        raise StreamFailure(Code.INTERNAL, f"the {self.name} engine adapter reads no embeddings")

    # ---------------------------------------------------------------- lifecycle

    async def start(self, timeout_s: float) -> None:
        """Start the engine command (if any), then wait until it serves. A configured
        command waits up to ``endpoint.ready_timeout_s`` (models take long to load)."""
        ep = self.replica.endpoint
        if not (ep.url or ep.port or ep.command):
            raise RuntimeError(
                f"replica {self.replica.id}: the {self.name} adapter needs endpoint.url, "
                "endpoint.port or endpoint.command"
            )
        self._stopping = False
        self._dead_reported = False
        port = ep.port or (free_port() if ep.command else 0)
        url = ep.url.replace("{port}", str(port)) if ep.url else f"http://127.0.0.1:{port}"
        self.base_url = url.rstrip("/")
        limits = httpx.Limits(
            max_connections=self.replica.slots + 8, max_keepalive_connections=self.replica.slots
        )
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            trust_env=False,  # no proxies from the environment: engines sit on loopback/LAN
            limits=limits,
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None),
        )
        try:
            if ep.command:
                argv = render_command(
                    ep.command, model_path=self.model_path(), port=port, model=ep.model
                )
                self._proc = EngineProcess(argv, self._log_path())
                await self._proc.start()
                timeout_s = ep.ready_timeout_s
            await self._wait_ready(timeout_s)
            with contextlib.suppress(httpx.HTTPError, ValueError, TypeError, KeyError):
                await self.describe(self.client)
        except BaseException:
            await self.stop()
            raise
        if self._proc is not None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_proc())

    def can_reload(self) -> bool:
        return bool(self.replica.endpoint.command)

    def model_path(self) -> str:
        """``{model_path}`` for the engine command: the path of a ``file:`` model_ref (so a
        reload to a new ref starts the engine on the new file), else ``endpoint.model_path``."""
        ref = self.replica.model_ref
        if ref.startswith("file:"):
            return ref.removeprefix("file:").removeprefix("//")
        return self.replica.endpoint.model_path

    def _log_path(self) -> str | None:
        if not self.engine_addr.startswith("ipc://"):
            return None
        run_dir = os.path.dirname(self.engine_addr.removeprefix("ipc://"))
        return os.path.join(run_dir, f"engine-{self.replica.id}.log")

    async def _wait_ready(self, timeout_s: float) -> None:
        assert self.client is not None
        deadline = time.monotonic() + timeout_s
        delay, last = 0.02, "no answer yet"
        while True:
            if self._proc is not None and self._proc.returncode is not None:
                raise RuntimeError(
                    f"engine exited with status {self._proc.returncode} before it was ready"
                    f"{self._proc.tail_text()}"
                )
            try:
                if await self.probe(self.client):
                    return
                last = "engine says it is not ready (loading)"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() + delay > deadline:
                raise RuntimeError(
                    f"engine at {self.base_url} not ready after {timeout_s}s ({last})"
                )
            await asyncio.sleep(delay)
            delay = min(READY_POLL_MAX_S, delay * 2)

    async def _watch_proc(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        if not self._stopping:
            self._engine_dead(f"engine process exited with status {code}{self._proc.tail_text()}")

    def _engine_dead(self, reason: str) -> None:
        if not self._dead_reported and not self._stopping:
            self._dead_reported = True
            self.sink.on_engine_dead(reason)

    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def stop(self) -> None:
        self._stopping = True
        self._tasks.clear()
        tasks = list(self._all)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        if self._proc is not None:
            await self._proc.stop()
            self._proc = None

    def resume(self) -> None:
        super().resume()
        self._resume.set()

    # ---------------------------------------------------------------- requests

    def submit(self, req: EngineRequest) -> None:
        task = asyncio.get_running_loop().create_task(self._run(req))
        self._tasks[req.rid] = task
        self._all.add(task)
        task.add_done_callback(self._all.discard)

    def abort(self, rid: int) -> None:
        """Cancel the request's task: its HTTP connection closes, so the engine aborts."""
        task = self._tasks.pop(rid, None)
        if task is not None:
            task.cancel()

    def _report_error(self, rid: int, code: Code, message: str, retry: int | None = None) -> None:
        if self._tasks.pop(rid, None) is not None:  # nothing after an abort or an end
            self.sink.on_error(rid, code.value, message, retry)

    def _report_finish(self, rid: int, reason: str) -> None:
        if self._tasks.pop(rid, None) is not None:
            self.sink.on_finish(rid, reason)

    def _report_embedding(self, rid: int, vectors: list[list[float]], tokens: int | None) -> None:
        if self._tasks.pop(rid, None) is not None:
            if tokens is not None:
                self.sink.on_usage(rid, tokens)
            self.sink.on_embedding(rid, vectors)

    async def _run(self, req: EngineRequest) -> None:
        rid = req.rid
        try:
            if req.workload == "embedding":
                await self._embed(req)
            elif req.messages is not None and not self.chat:
                raise StreamFailure(
                    Code.INVALID_PARAMS,
                    f"the {self.name} engine adapter does not serve chats (its API takes a"
                    " prompt, not messages); send a completion instead",
                )
            else:
                await self._stream(req)
        except StreamFailure as f:
            self._report_error(rid, f.code, f.message, f.retry_after_ms)
        except TimeoutError:
            ms = self.replica.decode_timeout_ms
            what = "embedding" if req.workload == "embedding" else "token"
            self._report_error(rid, Code.DECODE_TIMEOUT, f"no {what} from the engine for {ms} ms")
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            reason = f"cannot connect to engine at {self.base_url}: {e}"
            self._report_error(rid, Code.WORKER_RESET, reason)
            self._engine_dead(reason)
        except (httpx.TransportError, httpx.StreamError) as e:
            msg = f"engine connection lost mid-stream: {type(e).__name__}: {e}"
            self._report_error(rid, Code.WORKER_RESET, msg)
        except Exception as e:  # a bug here must still end the task, never hang it
            self._report_error(rid, Code.INTERNAL, f"adapter error: {type(e).__name__}: {e}")

    async def _stream(self, req: EngineRequest) -> None:
        client = self.client
        if client is None:
            raise StreamFailure(Code.WORKER_RESET, "engine is not running")
        loop = asyncio.get_running_loop()
        decode_s = self.replica.decode_timeout_ms / 1000.0
        hard_deadline = loop.time() + self.replica.endpoint.request_timeout_s
        path, body = self.request(req)
        st = StreamState(req)
        async with asyncio.timeout_at(min(loop.time() + decode_s, hard_deadline)) as tm:
            async with client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    raw = await resp.aread()
                    raise status_failure(resp.status_code, raw, resp.headers)
                async for name, data in sse_events(resp.aiter_lines()):
                    self.on_event(name, data, st)
                    if st.prompt_tokens is not None and not st.usage_sent:
                        st.usage_sent = True
                        self.sink.on_usage(req.rid, st.prompt_tokens)
                    if st.texts:
                        self.sink.on_tokens(req.rid, st.texts)
                        st.texts = []
                        tm.reschedule(min(loop.time() + decode_s, hard_deadline))
                    if st.done:
                        break
                    if self.paused:  # the supervisor's rings are full: stop reading
                        self._resume.clear()
                        await self._resume.wait()
                        tm.reschedule(min(loop.time() + decode_s, hard_deadline))
        if st.finish is None:
            raise StreamFailure(
                Code.WORKER_RESET, "engine closed the stream before the generation finished"
            )
        self._report_finish(req.rid, st.finish)

    async def _embed(self, req: EngineRequest) -> None:
        """One request, one JSON answer: no stream, so the decode timeout bounds the wait for
        the whole answer (as it bounds the wait for a stream's first token)."""
        client = self.client
        if client is None:
            raise StreamFailure(Code.WORKER_RESET, "engine is not running")
        path, body = self.embed_request(req)
        wait_s = min(
            self.replica.decode_timeout_ms / 1000.0, self.replica.endpoint.request_timeout_s
        )
        async with asyncio.timeout(wait_s):
            resp = await client.post(path, json=body)
        if resp.status_code != 200:
            raise status_failure(resp.status_code, resp.content, resp.headers)
        vectors, tokens = self.read_embedding(parse_json(resp.text), req)
        self._report_embedding(req.rid, vectors, tokens)


def engine_error(data: str) -> StreamFailure:
    """An error the engine reported inside its stream."""
    try:
        msg = error_message(data.encode())
    except Exception:
        msg = data[:200]
    return StreamFailure(Code.INTERNAL, f"engine error: {msg}")


def as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def as_count(value: Any) -> int | None:
    """A token count an engine reported (0 included), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
