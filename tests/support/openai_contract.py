"""contracts/openapi/openai.yaml, held against what orchd's OpenAI-compatible routes answer:
whole bodies by operation and status, and each streamed chunk."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from functools import cache
from typing import Any

import jsonschema

from tests.support.contract import ContractViolation, _doc, _resolve

DOC = "openai.yaml"


@cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    schema = _resolve({"$ref": f"{DOC}#/components/schemas/{schema_name}"}, DOC)
    return jsonschema.Draft202012Validator(schema)


def check(schema_name: str, value: Any) -> None:
    err = jsonschema.exceptions.best_match(_validator(schema_name).iter_errors(value))
    if err is not None:
        raise ContractViolation(f"{schema_name} {value!r}: {err.message}")


def check_response(path: str, status: int, body: bytes) -> Any:
    """The JSON body of a non-streamed answer, checked against its documented status."""
    item = _doc(DOC)["paths"][path]
    op = item.get("post") or item["get"]
    spec = op["responses"].get(str(status))
    if spec is None:
        raise ContractViolation(f"{path}: status {status} is not documented")
    spec = _resolve(spec, DOC)
    value = json.loads(body)
    schema = spec["content"]["application/json"]["schema"]
    err = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(value)
    )
    if err is not None:
        raise ContractViolation(f"{path} {status}: {value!r}: {err.message}")
    return value


def get(port: int, path: str, key: str = "dev") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post(port: int, path: str, body: dict[str, Any], key: str = "dev") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        conn.request("POST", path, json.dumps(body), headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stream_frames(port: int, path: str, body: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """(id, data) of each frame of a streamed answer, raw, as a client reads them."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Authorization": "Bearer dev", "Content-Type": "application/json"}
        conn.request("POST", path, json.dumps({**body, "stream": True}), headers)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("content-type", "").startswith("text/event-stream")
        frame_id, data = -1, ""
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                frame_id = int(line[4:])
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                yield frame_id, data
                frame_id, data = -1, ""
    finally:
        conn.close()
