"""How a task's events become bytes when it came through the OpenAI-compatible routes: chunks
of a streamed chat or completion, or one response body for a request that does not stream
(chat, completion or embeddings). Chosen per task at dispatch (``TaskSpec.api``); a task of
orchd's own API keeps the native frames the core writes itself (ipc/frames.py).

Stop strings are honoured here whatever the engine does: text that could still turn out to
be the start of a stop string is held back until it cannot, and a stop ends the task.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine_procs.runs import Run
from ipc import openai_frames as oa
from ipc import protocol as p
from ipc.frames import json_string
from orchd.core.errors import openai_error

_decode_str = msgspec.json.Decoder(str)


class StopScanner:
    """Releases streamed text up to the first stop string, holding back any tail that could
    be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        pending = self.pending + text
        found = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            self.pending = ""
            return pending[: min(found)]
        cut = max(0, len(pending) - self.keep)
        self.pending = pending[cut:]
        return pending[:cut]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class OpenAICodec:
    def __init__(self, spec: p.TaskSpec) -> None:
        self.kind = spec.api  # "chat" | "completions" | "embeddings"
        self.stream = spec.stream and self.kind != "embeddings"
        self.model = spec.model or spec.model_ref
        # The id clients see: the frontend scopes task ids by API key ("<key id>/chatcmpl-…").
        self.task_id = spec.task_id.rpartition("/")[2]
        self.created = spec.created
        self.usage_mode = spec.stream_usage
        self.shape = oa.ChunkShape(self.kind, self.task_id, self.model, spec.created)
        self.scanner = StopScanner(spec.stop) if spec.stop else None
        self.stopped = False  # a stop string was met: the task ends
        self.pieces: list[bytes] = []  # a whole response's text, as JSON string insides
        self.vectors: list[list[float]] = []
        self.role_sent = False
        self.encoding = spec.encoding_format

    def _usage_json(self, run: Run) -> bytes:
        return oa.encode(oa.usage(run.tokens_in, run.tokens))

    def started(self, run: Run) -> bytes:
        """The stream's first frame (event 0), or b"" when it has none (yet: with usage on
        every chunk, a chat's role chunk waits for the engine's first step, which brings
        the prompt's token count)."""
        if self.stream and self.kind == "chat" and self.usage_mode != "continuous":
            return oa.data_frame(0, self.shape.role())
        return b""

    def _role_owed(self, run: Run) -> list[bytes]:
        if (
            self.stream
            and self.kind == "chat"
            and self.usage_mode == "continuous"
            and not self.role_sent
        ):
            self.role_sent = True
            return [oa.data_frame(0, self.shape.role(oa.encode(oa.usage(run.tokens_in, 0))))]
        return []

    def tokens(self, run: Run, texts_json: list[bytes]) -> list[bytes]:
        """Frames for the engine's new tokens (none while a whole response is built)."""
        if self.scanner is not None:
            text = "".join(_decode_str.decode(tj) for tj in texts_json)
            released = self.scanner.feed(text)
            self.stopped = self.scanner.hit
            texts_json = [json_string(released)] if released else []
        if not self.stream:
            self.pieces += [tj[1:-1] for tj in texts_json]
            return []
        frames = self._role_owed(run)
        token = self.shape.token
        if self.usage_mode != "continuous":
            framed = self.shape.token_frame
            seq = run.seq
            for tj in texts_json:
                seq += 1
                frames.append(framed(seq, tj))
            run.seq = seq
            return frames
        # Usage on every chunk counts the tokens up to that chunk's (one chunk per token, or
        # one for the text a stop scan released).
        done = run.tokens - len(texts_json) if self.scanner is None else run.tokens - 1
        for tj in texts_json:
            run.seq += 1
            done += 1
            use = oa.encode(oa.usage(run.tokens_in, min(done, run.tokens)))
            frames.append(oa.data_frame(run.seq, token(tj, use)))
        return frames

    def end(self, run: Run, reason: str) -> bytes:
        """The terminal record: the last chunks and [DONE], or the whole response."""
        rest = self.scanner.flush() if self.scanner is not None and not self.stopped else ""
        tail = self.tokens(run, [json_string(rest)]) if rest else []
        if self.kind == "embeddings":
            return oa.embeddings_body(self.model, self.vectors, run.tokens_in, self.encoding)
        if not self.stream:
            text_json = b'"' + b"".join(self.pieces) + b'"'
            use = oa.usage(run.tokens_in, run.tokens)
            return oa.completion_body(
                self.kind, self.task_id, self.model, self.created, text_json, reason, use
            )
        tail = self._role_owed(run) + tail
        usage_json = self._usage_json(run)
        run.seq += 1
        cont = usage_json if self.usage_mode == "continuous" else b""
        tail.append(oa.data_frame(run.seq, self.shape.final(reason, cont)))
        if self.usage_mode:
            run.seq += 1
            tail.append(oa.data_frame(run.seq, self.shape.usage_only(usage_json)))
        tail.append(oa.DONE)
        return b"".join(tail)

    def error(self, run: Run, envelope: dict[str, Any]) -> bytes:
        body = openai_error(envelope)
        if self.stream:
            run.seq += 1
            return oa.error_frame(run.seq, body)
        return oa.encode(body)
