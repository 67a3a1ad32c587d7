"""orchd's configuration: one typed object, read from TOML and ``ORCHD_*`` env, in one place.

Only :func:`load` (in the launcher) reads files and the environment. The launcher writes the
resolved config, with the run-time names of rings and sockets, as JSON into the run directory;
every child process reads that file and nothing else (:func:`load_resolved`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any, Literal

import msgspec
import msgspec.inspect as mi

# Every choice is a name, checked once when the config is read. The implementations stay in
# the layer that owns them, in tables keyed by these names (tests/unit/test_config_tables.py
# holds each table to its type): ADAPTERS in engine_procs/adapters, POLICIES in
# orchd/core/placement.py, QUEUE_POLICIES in orchd/core/queue.py, STORES in
# orchd/scheduler/stores.py, levels in orchd/log.py.
Engine = Literal["mock", "vllm", "llamacpp", "tgi", "triton", "torch"]
AdapterName = Literal["mock", "openai", "llamacpp", "tgi", "triton", "torch"]
QueuePolicy = Literal["reject", "drop-lru"]
PlacementPolicy = Literal["default", "least-loaded", "round-robin"]
TrustPolicy = Literal["permissive", "strict"]  # strict: signed and verified models only
ArtifactStoreName = Literal["memory", "fs"]
LogLevel = Literal["debug", "info", "warning", "error"]
GpuMode = Literal["", "auto"]
Role = Literal["client", "admin"]  # client: the data plane; admin: also the control plane


class ConfigError(Exception):
    """A config file or override that cannot be used; the message says which and why."""


class MockEngine(msgspec.Struct, forbid_unknown_fields=True):
    """The mock engine: a real process that decodes like an engine, minus the model."""

    engine_version: str = "mock-1.0"
    ttft_ms: float = 5.0
    itl_ms: float = 2.0  # 0: unlimited rate (as fast as the supervisor drains)
    tokens_per_step: int = 1
    vocab_size: int = 512
    # Benchmarks only: each token's text is the engine's CLOCK_MONOTONIC ns at emission,
    # so a client on the same host measures engine-write-to-receipt latency.
    stamp_tokens: bool = False
    # Length of the mock's embedding vectors (deterministic unit vectors; see mock_engine.py).
    embedding_dim: int = 64
    # Fault injection (0 = off). Set per replica in config; never triggered by request content.
    crash_after_tokens: int = 0  # the engine process exits once any request reaches N tokens
    stall_after_tokens: int = 0  # a request stops producing tokens after N
    error_after_tokens: int = 0  # a request fails with an engine error after N


class TorchEngine(msgspec.Struct, forbid_unknown_fields=True):
    """The built-in ``torch`` engine: a transformers causal LM in its own process, batched
    greedy or seeded decoding with a KV cache. Its model is the replica's ``model_ref``: a
    ``file:`` directory holding a transformers model (config, weights, tokenizer), or
    ``random:<name>`` for random weights on a named config (engine_procs/torch_models.py)."""

    device: str = "auto"  # "auto": cuda when torch sees a GPU, else cpu; or "cpu", "cuda:0"
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu; or float16, float32, ...
    max_batch: int = 64  # requests decoded together; more wait in the engine
    max_seq_len: int = 4096  # prompt + output tokens per request (prompts are cut at the left)
    weights_seed: int = 0  # random: models draw their weights from this seed
    engine_version: str = ""  # "" = "torch-<torch version>"


class Endpoint(msgspec.Struct, forbid_unknown_fields=True):
    """How a supervisor reaches a real engine server, and optionally starts it."""

    url: str = ""  # base URL, e.g. "http://127.0.0.1:8001"; "" = http://127.0.0.1:{port}
    model: str = ""  # the model name the server expects (OpenAI "model", Triton model name)
    # Start the engine ourselves: argv with {model_path}, {port}, {model} substituted, e.g.
    # ["llama-server", "-m", "{model_path}", "--port", "{port}"]. Empty: the server is external.
    command: list[str] = msgspec.field(default_factory=list)
    port: int = 0  # substituted into {port}; 0 = a free port picked at start
    model_path: str = ""
    ready_timeout_s: float = 120.0  # also how long a mock or torch engine may take to load
    request_timeout_s: float = 600.0
    chat: bool = False  # openai adapter: /v1/chat/completions instead of /v1/completions


# The adapter that speaks to each engine unless a replica names another.
DEFAULT_ADAPTER: dict[Engine, AdapterName] = {
    "mock": "mock",
    "vllm": "openai",
    "llamacpp": "llamacpp",
    "tgi": "tgi",
    "triton": "triton",
    "torch": "torch",
}

# What each adapter can do beyond completions (the adapters' own ``chat`` / ``embeddings``
# flags say the same; tests/unit/test_config_tables.py keeps them in step). Admission refuses
# a chat or an embedding for a pool whose adapter is not named here, naming pool and engine.
CHAT_ADAPTERS: frozenset[AdapterName] = frozenset({"mock", "torch", "openai", "llamacpp", "tgi"})
EMBEDDING_ADAPTERS: frozenset[AdapterName] = frozenset({"mock", "torch", "openai"})


class Replica(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    pool_id: str = "default"
    engine: Engine = "mock"  # what tasks ask for
    adapter: Literal[AdapterName, ""] = ""  # how we speak to it; "" = DEFAULT_ADAPTER[engine]
    model_ref: str = "mock:tiny"
    slots: int = 64
    devices: str = ""  # CUDA_VISIBLE_DEVICES for the engine; "" = none
    decode_timeout_ms: int = 30_000  # no token for this long -> DECODE_TIMEOUT
    mock: MockEngine = msgspec.field(default_factory=MockEngine)
    torch: TorchEngine = msgspec.field(default_factory=TorchEngine)
    endpoint: Endpoint = msgspec.field(default_factory=Endpoint)

    @property
    def adapter_name(self) -> AdapterName:
        return self.adapter or DEFAULT_ADAPTER[self.engine]


class ApiKey(msgspec.Struct, forbid_unknown_fields=True):
    """A key with its role: ``{key = "sha256:<hex>", role = "client"}``. A plain string in
    ``api_keys`` is an admin key (what every key was before roles)."""

    key: str  # the secret itself, or "sha256:<64 hex digits>" of it
    role: Role
    max_streams: int = 0  # open SSE streams per frontend; 0 = limits.max_streams_per_key


class Server(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    frontends: int = 1
    api_keys: list[str | ApiKey] = msgspec.field(default_factory=list)
    # More keys, one a line: "<role> <key or sha256:hex>" ("#" starts a comment). Read at
    # start; its keys reach the other processes only as their sha256.
    api_keys_file: str = ""
    run_dir: str = ""  # "" = a fresh directory under /tmp
    drain_deadline_ms: int = 30_000
    log_level: LogLevel = "info"
    restart_backoff_ms: int = 200
    restart_backoff_max_ms: int = 5_000
    heartbeat_ms: int = 2_000  # a backup: the launcher sees a dead child at once
    peer_timeout_ms: int = 10_000
    # "auto": one replica per GPU that NVML finds, each a copy of the first [[replicas]]
    # entry with devices set to that GPU ("" = the replicas exactly as configured).
    gpus: GpuMode = ""


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    queue_capacity: int = 1024
    max_body_bytes: int = 1 << 20
    ring_bytes: int = 4 << 20
    stream_buffer_bytes: int = 4 << 20  # per stream, in the frontend, before it is cut off
    max_streams: int = 10_000  # per frontend
    max_streams_per_key: int = 0  # per frontend and API key; 0 = max_streams
    max_tokens_limit: int = 32_768
    ctx_limit: int = 1 << 20
    transcript_retention_ms: int = 60_000
    # The edge (orchd/frontend/edge.py): what one client may hold of a frontend.
    max_connections: int = 4096  # per frontend; past it idle ones are closed, else 503
    max_header_bytes: int = 16_384  # request line + headers; beyond it: 431
    max_headers: int = 100  # beyond it: 431
    header_timeout_ms: int = 10_000  # from connect (or a request's first byte) to its headers
    body_timeout_ms: int = 30_000  # from the headers to the end of the body; then 408
    keepalive_timeout_ms: int = 5_000  # an idle keep-alive connection is closed after this
    send_buffer_bytes: int = 262_144  # kernel send buffer (SO_SNDBUF) per connection; 0 = OS
    stall_timeout_ms: int = 5_000  # a stream cut off for reading too slowly: socket closed


class Pool(msgspec.Struct, forbid_unknown_fields=True):
    """A set of replicas serving one model on one engine, with versions pinned.

    Pools named by replicas but not listed under [[pools]] are derived from their first
    replica (engine, model_ref; versions pinned to what its engine reports first)."""

    id: str
    engine: Engine = "mock"
    model_ref: str = "mock:tiny"
    engine_version: str = ""  # "" = pinned to the first version a replica reports
    sampler_profile_version: str = "v1"
    supported_workloads: list[str] = msgspec.field(default_factory=lambda: ["completion"])
    kv_bytes_per_token: int = 1024  # for sessions' kv_bytes estimate


class Budget(msgspec.Struct, forbid_unknown_fields=True):
    """Per-session allowances; 0 means unlimited."""

    tokens: int = 0
    time_ms: int = 0
    cost: float = 0.0


class Scheduling(msgspec.Struct, forbid_unknown_fields=True):
    queue_policy: QueuePolicy = "reject"
    placement: PlacementPolicy = "default"
    # Weighted fairness across API keys: key -> weight (default 1.0).
    key_weights: dict[str, float] = msgspec.field(default_factory=dict)
    metrics_interval_ms: int = 1000  # SSE `metrics` frames per stream; 0 = none
    # Token coalescing: after the first token, a stream's frames are written every N tokens
    # or every stream_interval_ms, whichever comes first (1 = every token at once). Each token
    # is still its own SSE event; only the writes are batched.
    stream_interval_tokens: int = 1
    stream_interval_ms: float = 10.0


class Sessions(msgspec.Struct, forbid_unknown_fields=True):
    ttl_ms: int = 600_000
    max_turns: int = 8
    cost_per_token: float = 0.0
    session_budget: Budget = msgspec.field(default_factory=Budget)
    key_budgets: dict[str, Budget] = msgspec.field(default_factory=dict)  # API key -> budget


class Catalog(msgspec.Struct, forbid_unknown_fields=True):
    catalog_dir: str = ""  # "" = the catalog lives in memory only
    trust_policy: TrustPolicy = "permissive"
    signing_keys: dict[str, str] = msgspec.field(default_factory=dict)  # key id -> HMAC secret
    # file: model refs resolve only under these directories ([] = <run_dir>/models).
    model_roots: list[str] = msgspec.field(default_factory=list)
    verify_max_bytes: int = 64 << 30  # a verify reads at most this much
    verify_timeout_ms: int = 600_000  # ... for at most this long
    verify_concurrency: int = 2  # verifications at once; more: 429


class Artifacts(msgspec.Struct, forbid_unknown_fields=True):
    artifact_store: ArtifactStoreName = "memory"
    artifact_dir: str = ""  # for fs; "" = <run_dir>/artifacts
    artifact_memory_bytes: int = 256 << 20  # memory store: oldest evicted beyond this
    transcripts: bool = True  # store each stream's transcript as a `trace` artifact


class Config(msgspec.Struct, forbid_unknown_fields=True):
    server: Server = msgspec.field(default_factory=Server)
    limits: Limits = msgspec.field(default_factory=Limits)
    scheduling: Scheduling = msgspec.field(default_factory=Scheduling)
    sessions: Sessions = msgspec.field(default_factory=Sessions)
    catalog: Catalog = msgspec.field(default_factory=Catalog)
    artifacts: Artifacts = msgspec.field(default_factory=Artifacts)
    pools: list[Pool] = msgspec.field(default_factory=list)
    replicas: list[Replica] = msgspec.field(
        default_factory=lambda: [Replica(id="r0"), Replica(id="r1")]
    )

    def all_pools(self) -> list[Pool]:
        """Configured pools plus those only named by replicas."""
        pools = {p.id: p for p in self.pools}
        for r in self.replicas:
            if r.pool_id not in pools:
                pools[r.pool_id] = Pool(id=r.pool_id, engine=r.engine, model_ref=r.model_ref)
        return list(pools.values())


class Runtime(msgspec.Struct):
    """Names the launcher made for this run: where every child finds its rings and sockets."""

    run_dir: str
    tag: str
    scheduler_addr: str

    def ring_name(self, replica_index: int, frontend: int) -> str:
        return f"/orchd-{self.tag}-r{replica_index}-f{frontend}"

    def bell_path(self, frontend: int) -> str:
        return os.path.join(self.run_dir, f"fe{frontend}.bell")

    def engine_addr(self, replica_index: int) -> str:
        return f"ipc://{self.run_dir}/engine-{replica_index}.sock"


class Resolved(msgspec.Struct):
    config: Config
    runtime: Runtime


_ENV_PREFIX = "ORCHD_"
_NOT_FIELDS = ("ORCHD_CONFIG", "ORCHD_NVML_MODULE", "ORCHD_GIT_SHA")  # read elsewhere


def _overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``ORCHD_<FIELD>`` for any scalar field of a section (names are unique across them)."""
    sections: dict[str, type[msgspec.Struct]] = {
        "server": Server,
        "limits": Limits,
        "scheduling": Scheduling,
        "sessions": Sessions,
        "catalog": Catalog,
        "artifacts": Artifacts,
    }
    out: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, raw in env.items():
        if not key.startswith(_ENV_PREFIX) or key in _NOT_FIELDS:
            continue
        name = key[len(_ENV_PREFIX) :].lower()
        for section, cls in sections.items():
            if name in cls.__struct_fields__:
                value: Any = raw
                if name in ("api_keys", "model_roots"):
                    value = [k.strip() for k in raw.split(",") if k.strip()]
                out[section][name] = value
                break
        else:
            raise ConfigError(f"unknown environment override {key}")
    return out


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Config:
    """File (optional) < ``ORCHD_*`` env < command-line flags (server fields)."""
    env = os.environ if env is None else env
    path = path or env.get("ORCHD_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config {path} is not valid TOML: {e}") from e
    for section, values in _overrides(env).items():
        data.setdefault(section, {}).update(values)
    for key, value in (cli or {}).items():
        if value is not None:
            data.setdefault("server", {})[key] = value
    try:
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid config: {_explain(e, data)}") from e
    if cfg.server.api_keys_file:
        cfg.server.api_keys += read_keys_file(cfg.server.api_keys_file)
    validate(cfg)
    return cfg


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
    """msgspec's message, or for a name field (a Literal) the field, the value and the names
    it may take: ``replicas[0].engine: unknown engine 'x' (known: 'llamacpp', 'mock', ...)``."""
    m = _AT.search(str(e))
    if m is None:
        return str(e)
    t: Any = mi.type_info(Config)
    value, field = data, ""
    for name, index in _STEP.findall(m.group(1)):
        if name and isinstance(t, mi.StructType):
            t = next((f.type for f in t.fields if f.encode_name == name), None)
            value = value.get(name) if isinstance(value, dict) else None
            field = name
        elif index and isinstance(t, mi.ListType):
            t = t.item_type
            value = value[int(index)] if isinstance(value, list) else None
        else:
            return str(e)
    if not isinstance(t, mi.LiteralType):
        return str(e)
    known = ", ".join(repr(v) for v in t.values)
    return f"{m.group(1).lstrip('.')}: unknown {field} {value!r} (known: {known})"


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
    if lim.max_streams_per_key < 0 or lim.send_buffer_bytes < 0:
        raise ConfigError("limits.max_streams_per_key and send_buffer_bytes must be >= 0")
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
