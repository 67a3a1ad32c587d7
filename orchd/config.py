"""orchd's configuration: read from TOML, ``ORCHD_*`` env and flags, checked, in one place.

The typed objects live in :mod:`orchd.config_schema` and are re-exported here. Only
:func:`load` (the launcher, ``orchd check``, ``orchd config``) reads files and the environment;
values keep their TOML types (``ttft_ms = "5"`` is an error, never coerced), an environment
value is parsed as its field's type, and every value's source is recorded
(:func:`load_sourced`). The launcher writes the resolved config, with the run-time names of
rings and sockets, as JSON into the run directory; every child process reads that file and
nothing else (:func:`load_resolved`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

import msgspec
import msgspec.inspect as mi

from orchd.config_schema import (
    CHAT_ADAPTERS,
    DEFAULT_ADAPTER,
    EMBEDDING_ADAPTERS,
    AdapterName,
    ApiKey,
    Artifacts,
    ArtifactStoreName,
    Budget,
    Catalog,
    Config,
    ConfigError,
    Endpoint,
    Engine,
    GpuMode,
    Limits,
    LogFormat,
    LogLevel,
    MockEngine,
    PlacementPolicy,
    Pool,
    QueuePolicy,
    Replica,
    Resolved,
    Role,
    Runtime,
    Scheduling,
    Server,
    Sessions,
    TorchEngine,
    TrustPolicy,
)

__all__ = [
    "CHAT_ADAPTERS",
    "DEFAULT_ADAPTER",
    "EMBEDDING_ADAPTERS",
    "AdapterName",
    "ApiKey",
    "ArtifactStoreName",
    "Artifacts",
    "Budget",
    "Catalog",
    "Config",
    "ConfigError",
    "Endpoint",
    "Engine",
    "GpuMode",
    "Limits",
    "LogFormat",
    "LogLevel",
    "MockEngine",
    "PlacementPolicy",
    "Pool",
    "QueuePolicy",
    "Replica",
    "Resolved",
    "Role",
    "Runtime",
    "Scheduling",
    "Server",
    "Sessions",
    "TorchEngine",
    "TrustPolicy",
    "child_env",
    "effective_api_keys",
    "is_loopback",
    "load",
    "load_resolved",
    "load_sourced",
    "read_keys_file",
    "validate",
    "write_resolved",
]

ENV_PREFIX = "ORCHD_"
ENV_CONFIG = "ORCHD_CONFIG"  # the config file, when --config is not given
# Variables that are not config fields, read where they are used: a fake NVML for tests and
# demos without a GPU (orchd/telemetry), and the git sha a build was made from (orchd/build_info).
ENV_OTHER = (ENV_CONFIG, "ORCHD_NVML_MODULE", "ORCHD_GIT_SHA")
# The sections whose plain fields an ``ORCHD_<FIELD>`` variable sets (names are unique
# across them); tables and lists of tables are set in the file only.
ENV_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "server": Server,
    "limits": Limits,
    "scheduling": Scheduling,
    "sessions": Sessions,
    "catalog": Catalog,
    "artifacts": Artifacts,
}
_LIST_FIELDS = frozenset({"api_keys", "model_roots"})  # comma-separated in the environment
_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})

# Where a value came from: "default", "file <path>", "env ORCHD_X" or "flag --x".
Sources = dict[str, str]


def _env_value(var: str, raw: str, t: Any) -> Any:
    """``raw`` parsed as the field's type: "8080" is an int for an int field, "x" is an
    error naming the variable, never a string passed on to be coerced."""
    if isinstance(t, mi.IntType):
        try:
            return int(raw.strip(), 10)
        except ValueError:
            raise ConfigError(f"{var}: expected an integer, got {raw!r}") from None
    if isinstance(t, mi.FloatType):
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"{var}: expected a number, got {raw!r}") from None
    if isinstance(t, mi.BoolType):
        v = raw.strip().lower()
        if v in _TRUE or v in _FALSE:
            return v in _TRUE
        raise ConfigError(f"{var}: expected true or false, got {raw!r}")
    if isinstance(t, mi.StrType | mi.LiteralType):
        return raw
    raise ConfigError(f"{var}: this field is a table or list; set it in the config file")


def _overrides(env: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], Sources]:
    """``ORCHD_<FIELD>`` for any plain field of a section; an unknown ``ORCHD_*`` is an error
    (a typo must not be silently ignored)."""
    out: dict[str, dict[str, Any]] = {name: {} for name in ENV_SECTIONS}
    sources: Sources = {}
    for var, raw in sorted(env.items()):
        if not var.startswith(ENV_PREFIX) or var in ENV_OTHER:
            continue
        name = var[len(ENV_PREFIX) :].lower()
        for section, cls in ENV_SECTIONS.items():
            fields = {f.name: f.type for f in mi.type_info(cls).fields}  # type: ignore[attr-defined]
            if name in fields:
                if name in _LIST_FIELDS:
                    value: Any = [k.strip() for k in raw.split(",") if k.strip()]
                else:
                    value = _env_value(var, raw, fields[name])
                out[section][name] = value
                sources[f"{section}.{name}"] = f"env {var}"
                break
        else:
            known = ", ".join(
                sorted(
                    ENV_PREFIX + f.upper()
                    for c in ENV_SECTIONS.values()
                    for f in c.__struct_fields__
                )
            )
            raise ConfigError(
                f"unknown environment variable {var} (known: {', '.join(ENV_OTHER)}, {known})"
            )
    return out, sources


def _leaves(prefix: str, value: Any, source: str, into: Sources) -> None:
    """Every leaf path of a TOML value (``replicas[0].mock.ttft_ms``) -> ``source``."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _leaves(f"{prefix}.{k}" if prefix else k, v, source, into)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            _leaves(f"{prefix}[{i}]", v, source, into)
    else:
        into[prefix] = source


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Config:
    """File (optional) < ``ORCHD_*`` env < command-line flags (server fields)."""
    return load_sourced(path, env, cli)[0]


def load_sourced(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> tuple[Config, Sources]:
    """:func:`load`, and where each value set came from (a path absent is a default)."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG) or None
    data: dict[str, Any] = {}
    sources: Sources = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config {path} is not valid TOML: {e}") from e
        _leaves("", data, f"file {path}", sources)
    overrides, env_sources = _overrides(env)
    for section, values in overrides.items():
        if values and not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"invalid config: [{section}] must be a table")
        data.setdefault(section, {}).update(values)
    sources.update(env_sources)
    for key, value in (cli or {}).items():
        if value is not None:
            data.setdefault("server", {})[key] = value
            sources[f"server.{key}"] = f"flag --{key.replace('_', '-')}"
    try:
        cfg = msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid config: {_explain(e, data)}") from e
    if cfg.server.api_keys_file:
        cfg.server.api_keys += read_keys_file(cfg.server.api_keys_file)
    validate(cfg)
    return cfg, sources


def read_keys_file(path: str) -> list[str | ApiKey]:
    """``<role> <key>`` a line; each key kept as its sha256 (children never see the secret)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read server.api_keys_file {path}: {e}") from e
    out: list[str | ApiKey] = []
    for n, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or words[0] not in ("client", "admin"):
            raise ConfigError(
                f"server.api_keys_file {path} line {n}: expected '<client|admin> <key>'"
            )
        role: Role = "admin" if words[0] == "admin" else "client"
        key = words[1]
        if not key.startswith("sha256:"):
            key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        out.append(ApiKey(key, role))
    return out


_AT = re.compile(r" - at `\$(.*)`$")
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")


def _explain(e: msgspec.ValidationError, data: Any) -> str:
    """Where and what: ``replicas[0].mock.ttft_ms: expected a float, got '5' (a str)``, or for
    a name field (a Literal) the names it may take: ``replicas[0].engine: unknown engine 'x'
    (known: 'llamacpp', 'mock', ...)``."""
    m = _AT.search(str(e))
    if m is None:
        return str(e)
    where = m.group(1).lstrip(".")
    t: Any = mi.type_info(Config)
    value, field, found = data, "", True
    for name, index in _STEP.findall(m.group(1)):
        if name and isinstance(t, mi.StructType):
            t = next((f.type for f in t.fields if f.encode_name == name), None)
            found = found and isinstance(value, dict) and name in value
            value = value.get(name) if isinstance(value, dict) else None
            field = name
        elif index and isinstance(t, mi.ListType):
            t = t.item_type
            value = value[int(index)] if isinstance(value, list) else None
        else:
            t = None
    if isinstance(t, mi.LiteralType):
        known = ", ".join(repr(v) for v in t.values)
        return f"{where}: unknown {field} {value!r} (known: {known})"
    expected = _EXPECTED.search(str(e))
    if expected is not None and found:
        got = f"{value!r} (a {type(value).__name__}, not converted)"
        return f"{where}: expected {expected.group(1)}, got {got}"
    return f"{where}: {str(e)[: m.start()]}"


_EXPECTED = re.compile(r"^Expected `([^`]+)`, got `[^`]+`")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(cfg: Config) -> None:
    s, lim = cfg.server, cfg.limits
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"server.port must be 0..65535, got {s.port}")
    if not 1 <= s.frontends <= 64:
        raise ConfigError(f"server.frontends must be 1..64, got {s.frontends}")
    if not cfg.replicas:
        raise ConfigError("at least one [[replicas]] entry is needed")
    ids = [r.id for r in cfg.replicas]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"replica ids must be unique: {ids}")
    for r in cfg.replicas:
        if r.slots < 1:
            raise ConfigError(f"replica {r.id}: slots must be >= 1")
    if lim.ring_bytes < 4096 or lim.ring_bytes & (lim.ring_bytes - 1):
        raise ConfigError(f"limits.ring_bytes must be a power of two >= 4096, got {lim.ring_bytes}")
    if lim.queue_capacity < 1:
        raise ConfigError("limits.queue_capacity must be >= 1")
    pool_ids = {p.id for p in cfg.all_pools()}
    for pool in cfg.pools:
        members = [r for r in cfg.replicas if r.pool_id == pool.id]
        for r in members:
            if r.engine != pool.engine or r.model_ref != pool.model_ref:
                raise ConfigError(
                    f"replica {r.id} is in pool {pool.id} but serves {r.engine}/{r.model_ref}; "
                    f"the pool pins {pool.engine}/{pool.model_ref}"
                )
    if len(pool_ids) != len(cfg.all_pools()):
        raise ConfigError("pool ids must be unique")
    for i, entry in enumerate(s.api_keys):
        _check_key(f"server.api_keys[{i}]", entry)
    for name, value in (
        ("max_connections", lim.max_connections),
        ("max_header_bytes", lim.max_header_bytes),
        ("max_headers", lim.max_headers),
        ("header_timeout_ms", lim.header_timeout_ms),
        ("body_timeout_ms", lim.body_timeout_ms),
        ("keepalive_timeout_ms", lim.keepalive_timeout_ms),
        ("stall_timeout_ms", lim.stall_timeout_ms),
    ):
        if value < 1:
            raise ConfigError(f"limits.{name} must be >= 1, got {value}")
    if lim.max_header_bytes < 1024:
        raise ConfigError(f"limits.max_header_bytes must be >= 1024, got {lim.max_header_bytes}")
    if min(lim.max_streams_per_key, lim.send_buffer_bytes, lim.resume_grace_ms) < 0:
        raise ConfigError("limits.max_streams_per_key, send_buffer_bytes, resume_grace_ms: >= 0")
    c = cfg.catalog
    if c.verify_concurrency < 1 or c.verify_max_bytes < 1 or c.verify_timeout_ms < 1:
        raise ConfigError("catalog.verify_concurrency, verify_max_bytes, verify_timeout_ms: >= 1")
    for root in c.model_roots:
        if not os.path.isabs(root):
            raise ConfigError(f"catalog.model_roots: {root!r} is not an absolute path")
    if not s.api_keys and not is_loopback(s.host):
        raise ConfigError(
            f"refusing to listen on non-loopback address {s.host} with no API keys: "
            "set server.api_keys or ORCHD_API_KEYS"
        )


_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces


def _check_key(where: str, entry: str | ApiKey) -> None:
    key = entry if isinstance(entry, str) else entry.key
    if not key.strip():
        raise ConfigError(f"{where} is empty: an empty key would let anyone in")
    if not _KEY_CHARS.match(key):
        raise ConfigError(f"{where}: a key is printable ASCII without spaces")
    if key.startswith("sha256:") and not _SHA256.match(key):
        raise ConfigError(f"{where}: sha256: must be followed by 64 lowercase hex digits")
    if isinstance(entry, ApiKey) and entry.max_streams < 0:
        raise ConfigError(f"{where}: max_streams must be >= 0")


def effective_api_keys(cfg: Config) -> list[str | ApiKey]:
    """Configured keys, or the development key ``dev`` (an admin) on a loopback address."""
    return list(cfg.server.api_keys) or ["dev"]


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment a child process starts with: ours, plus ``extra``."""
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_resolved(resolved: Resolved, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(resolved))
    os.replace(tmp, path)


def load_resolved(path: str) -> Resolved:
    with open(path, "rb") as f:
        return msgspec.json.decode(f.read(), type=Resolved)
