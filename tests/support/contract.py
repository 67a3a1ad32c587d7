"""Every response the integration tests receive is checked against contracts/openapi/*.yaml:
its status must be documented for the operation, its documented headers present and valid,
its JSON body valid against the schema, and each SSE event's data valid against its event
schema. A response outside the contract fails the test that received it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2] / "contracts" / "openapi"
FILES = ("data.yaml", "control.yaml")


class ContractViolation(AssertionError):
    pass


@cache
def _doc(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return data


def _resolve(node: Any, doc: str) -> Any:
    """Inline every $ref (the contracts have no cycles)."""
    if isinstance(node, dict):
        if "$ref" in node:
            ref = node["$ref"]
            target_doc, _, pointer = ref.partition("#")
            target_doc = target_doc or doc
            cur: Any = _doc(target_doc)
            for part in pointer.strip("/").split("/"):
                cur = cur[part]
            return _resolve(cur, target_doc)
        return {k: _resolve(v, doc) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, doc) for v in node]
    return node


@cache
def _operations() -> list[tuple[str, re.Pattern[str], str, str]]:
    ops = []
    for name in FILES:
        for path, item in _doc(name)["paths"].items():
            pattern = re.compile("^" + re.sub(r"\{[^}]+\}", r"[^/]+", path) + "$")
            for method in ("get", "post", "delete", "put"):
                if method in item:
                    ops.append((method.upper(), pattern, path, name))
    # literal paths before templated ones
    ops.sort(key=lambda o: o[2].count("{"))
    return ops


def api_version() -> str:
    version: str = _doc("data.yaml")["info"]["version"]
    return version


def operation(method: str, path: str) -> tuple[dict[str, Any], str] | None:
    path = path.split("?", 1)[0]
    for m, pattern, template, name in _operations():
        if m == method and pattern.match(path):
            return _doc(name)["paths"][template][method.lower()], name
    return None


def check_response(
    method: str, path: str, status: int, headers: dict[str, str], body: bytes
) -> None:
    found = operation(method, path)
    if found is None:
        if status == 404 or status == 405:
            _check_json(body, "data.yaml", {"$ref": "data.yaml#/components/schemas/ErrorEnvelope"})
            return
        raise ContractViolation(f"{method} {path} answered {status} but is not in the contract")
    op, doc = found
    responses = op["responses"]
    spec = responses.get(str(status))
    if spec is None:
        raise ContractViolation(
            f"{method} {path}: status {status} is not documented ({sorted(responses)})"
        )
    spec = _resolve(spec, doc)
    for name, h in (spec.get("headers") or {}).items():
        value = headers.get(name.lower())
        if value is None:
            if h.get("required"):
                raise ContractViolation(f"{method} {path} {status}: header {name} missing")
            continue
        try:
            jsonschema.validate(_typed(value, h.get("schema", {})), h.get("schema", {}))
        except (jsonschema.ValidationError, ValueError) as e:
            why = e.message if isinstance(e, jsonschema.ValidationError) else str(e)
            raise ContractViolation(
                f"{method} {path} {status}: header {name}={value!r}: {why}"
            ) from None
    content = spec.get("content") or {}
    if "application/json" in content:
        if not headers.get("content-type", "").startswith("application/json"):
            raise ContractViolation(
                f"{method} {path} {status}: content-type {headers.get('content-type')}"
            )
        _check_json(body, doc, content["application/json"]["schema"])
    elif not content and body:
        raise ContractViolation(
            f"{method} {path} {status}: body where none is documented: {body[:200]!r}"
        )


def _typed(value: str, schema: dict[str, Any]) -> Any:
    """A header's text as the type its schema gives: an integer is digits only (int64), a
    number a finite JSON number; anything else stays text."""
    kind = schema.get("type")
    if kind == "integer":
        if not re.fullmatch(r"-?[0-9]{1,19}", value):
            raise ValueError("not an int64")
        return int(value)
    if kind == "number":
        if not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?", value):
            raise ValueError("not a JSON number")
        return float(value)
    return value


def _check_json(body: bytes, doc: str, schema: dict[str, Any]) -> None:
    try:
        value = json.loads(body)
    except ValueError:
        raise ContractViolation(f"body is not JSON: {body[:200]!r}") from None
    try:
        jsonschema.validate(value, _resolve(schema, doc), cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as e:
        raise ContractViolation(f"body {value!r} breaks the contract: {e.message}") from None


@cache
def _event_validators() -> dict[str, jsonschema.Draft202012Validator]:
    op = _doc("data.yaml")["paths"]["/v1/tasks/{task_id}/stream"]["get"]
    events = op["responses"]["200"]["content"]["text/event-stream"]["x-sse-events"]
    return {k: jsonschema.Draft202012Validator(_resolve(v, "data.yaml")) for k, v in events.items()}


def check_event(event: str, data: str) -> None:
    validators = _event_validators()
    if event not in validators:
        raise ContractViolation(f"SSE event {event!r} is not in the contract")
    err = jsonschema.exceptions.best_match(validators[event].iter_errors(json.loads(data)))
    if err is not None:
        raise ContractViolation(f"SSE {event} {data}: {err.message}")


# ---------------------------------------------------------------- examples, replayed


def examples() -> list[tuple[str, str, dict[str, Any], Any]]:
    """Every ``example`` in the documents with the schema it illustrates:
    ``(doc, where, schema, example)``. An example sits beside ``schema`` (a parameter, a
    media type) or inside it (a schema's own ``example``)."""
    found: list[tuple[str, str, dict[str, Any], Any]] = []

    def walk(node: Any, doc: str, where: str) -> None:
        if isinstance(node, dict):
            if "example" in node:
                schema = node.get("schema", node)
                found.append((doc, where, _resolve(schema, doc), node["example"]))
            for k, v in node.items():
                if k != "example":
                    walk(v, doc, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, doc, f"{where}/{i}")

    for name in FILES:
        walk(_doc(name), name, "")
    return found


def example_of(node: dict[str, Any], doc: str) -> Any:
    """The example of a parameter or media type: its own, else its schema's."""
    node = _resolve(node, doc)
    if "example" in node:
        return node["example"]
    return node.get("schema", {}).get("example")


@dataclass(frozen=True)
class Replay:
    operation_id: str
    method: str
    path: str  # path parameters filled in from their examples
    body: Any  # the request body's example, or None
    status: int  # the first 2xx documented


def replays() -> dict[str, Replay]:
    """One request per operation, built from the documents' examples alone."""
    out: dict[str, Replay] = {}
    for name in FILES:
        for template, item in _doc(name)["paths"].items():
            shared = item.get("parameters", [])
            for method in ("get", "post", "delete", "put"):
                op = item.get(method)
                if op is None:
                    continue
                path, query = template, []
                for prm in [*shared, *op.get("parameters", [])]:
                    prm = _resolve(prm, name)
                    value = example_of(prm, name)
                    if prm["in"] == "path":
                        assert value is not None, f"{name} {template}: {prm['name']} has no example"
                        path = path.replace("{" + prm["name"] + "}", str(value))
                    elif prm["in"] == "query" and value is not None:
                        query.append(f"{prm['name']}={value}")
                body = None
                if "requestBody" in op:
                    media = _resolve(op["requestBody"], name)["content"]["application/json"]
                    body = example_of(media, name)
                    assert body is not None, f"{name} {method} {template}: no body example"
                ok = sorted(int(s) for s in op["responses"] if s.startswith("2"))
                full = path + ("?" + "&".join(query) if query else "")
                out[op["operationId"]] = Replay(
                    op["operationId"], method.upper(), full, body, ok[0]
                )
    return out
