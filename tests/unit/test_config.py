"""Configuration (orchd/config.py): defaults, TOML, env and cli overrides, validation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec
import pytest

from orchd.config import (
    Config,
    ConfigError,
    Resolved,
    Runtime,
    effective_api_keys,
    is_loopback,
    load,
    load_resolved,
    load_sourced,
    write_resolved,
)
from orchd.keys import key_entry, key_id


def test_defaults() -> None:
    cfg = load(env={})
    assert [r.id for r in cfg.replicas] == ["r0", "r1"]
    assert all(r.engine == "mock" for r in cfg.replicas)
    assert cfg.server.host == "127.0.0.1"
    assert cfg.server.port == 8080
    assert cfg.server.frontends == 1
    assert cfg.server.api_keys == []
    assert cfg.limits.ring_bytes & (cfg.limits.ring_bytes - 1) == 0
    assert cfg == Config()


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "orchd.toml"
    path.write_text(
        """
[server]
port = 9000
frontends = 2
api_keys = ["k1"]

[limits]
queue_capacity = 7
ring_bytes = 65536

[[replicas]]
id = "a"
slots = 4
[replicas.mock]
ttft_ms = 1
itl_ms = 0

[[replicas]]
id = "b"
pool_id = "p2"
"""
    )
    cfg = load(str(path), env={})
    assert cfg.server.port == 9000
    assert cfg.server.frontends == 2
    assert cfg.server.api_keys == ["k1"]
    assert cfg.server.host == "127.0.0.1"  # untouched default
    assert cfg.limits.queue_capacity == 7
    assert cfg.limits.ring_bytes == 65536
    assert [(r.id, r.slots, r.pool_id) for r in cfg.replicas] == [
        ("a", 4, "default"),
        ("b", 64, "p2"),
    ]
    assert cfg.replicas[0].mock.ttft_ms == 1.0
    assert cfg.replicas[0].mock.itl_ms == 0.0


def test_toml_path_from_orchd_config_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 9001\n")
    assert load(env={"ORCHD_CONFIG": str(path)}).server.port == 9001


def test_bad_toml_missing_file_and_unknown_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(bad), env={})
    with pytest.raises(ConfigError, match="cannot read config"):
        load(str(tmp_path / "missing.toml"), env={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match="invalid config"):
        load(str(unknown), env={})


def test_env_overrides() -> None:
    cfg = load(
        env={
            "ORCHD_PORT": "9100",
            "ORCHD_API_KEYS": "alpha, beta,,gamma ",
            "ORCHD_QUEUE_CAPACITY": "5",
            "PATH": "/bin",  # not ours: ignored
        }
    )
    assert cfg.server.port == 9100
    assert cfg.server.api_keys == ["alpha", "beta", "gamma"]
    assert cfg.limits.queue_capacity == 5


def test_env_beats_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 9000\n[limits]\nqueue_capacity = 3\n")
    cfg = load(str(path), env={"ORCHD_PORT": "9100"})
    assert cfg.server.port == 9100
    assert cfg.limits.queue_capacity == 3


def test_env_bad_value_raises() -> None:
    with pytest.raises(ConfigError):
        load(env={"ORCHD_PORT": "eighty"})


def test_unknown_env_override_raises() -> None:
    with pytest.raises(ConfigError, match="ORCHD_NO_SUCH_THING"):
        load(env={"ORCHD_NO_SUCH_THING": "1"})


def test_cli_beats_env() -> None:
    cfg = load(
        env={"ORCHD_PORT": "9100", "ORCHD_FRONTENDS": "3"}, cli={"port": 9200, "frontends": None}
    )
    assert cfg.server.port == 9200
    assert cfg.server.frontends == 3  # a None flag was not given


def test_non_loopback_without_keys_refused() -> None:
    with pytest.raises(ConfigError, match="non-loopback"):
        load(env={"ORCHD_HOST": "0.0.0.0"})
    with pytest.raises(ConfigError, match="non-loopback"):
        load(env={}, cli={"host": "10.1.2.3"})


def test_non_loopback_with_keys_ok() -> None:
    cfg = load(env={"ORCHD_HOST": "0.0.0.0", "ORCHD_API_KEYS": "secret"})
    assert cfg.server.host == "0.0.0.0"
    assert effective_api_keys(cfg) == ["secret"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.5.5.5"])
def test_loopback_hosts_need_no_keys(host: str) -> None:
    assert is_loopback(host)
    assert load(env={"ORCHD_HOST": host}).server.host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.1", "example.com", "::"])
def test_not_loopback(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize("value", ["5000", "2048", "0", "12288"])
def test_ring_bytes_must_be_power_of_two(value: str) -> None:
    with pytest.raises(ConfigError, match="ring_bytes"):
        load(env={"ORCHD_RING_BYTES": value})


def test_ring_bytes_power_of_two_ok() -> None:
    assert load(env={"ORCHD_RING_BYTES": "8192"}).limits.ring_bytes == 8192


def test_other_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="frontends"):
        load(env={"ORCHD_FRONTENDS": "0"})
    with pytest.raises(ConfigError, match="port"):
        load(env={"ORCHD_PORT": "70000"})
    with pytest.raises(ConfigError, match="queue_capacity"):
        load(env={"ORCHD_QUEUE_CAPACITY": "0"})
    dup = tmp_path / "dup.toml"
    dup.write_text('[[replicas]]\nid = "a"\n[[replicas]]\nid = "a"\n')
    with pytest.raises(ConfigError, match="unique"):
        load(str(dup), env={})
    eng = tmp_path / "eng.toml"
    eng.write_text('[[replicas]]\nid = "a"\nengine = "nosuch"\n')
    with pytest.raises(ConfigError, match=r"replicas\[0\]\.engine: unknown engine .nosuch."):
        load(str(eng), env={})


def test_effective_api_keys_default_dev() -> None:
    assert effective_api_keys(load(env={})) == ["dev"]
    assert effective_api_keys(load(env={"ORCHD_API_KEYS": "a,b"})) == ["a", "b"]


def test_resolved_round_trip(tmp_path: Path) -> None:
    cfg = load(env={"ORCHD_PORT": "9300", "ORCHD_API_KEYS": "k"})
    rt = Runtime(run_dir=str(tmp_path), tag="abc123", scheduler_addr=f"ipc://{tmp_path}/s.sock")
    path = str(tmp_path / "resolved.json")
    write_resolved(Resolved(cfg, rt), path)
    assert not os.path.exists(path + ".tmp")
    back = load_resolved(path)
    assert back == Resolved(cfg, rt)
    assert back.config.server.port == 9300
    assert back.runtime.ring_name(1, 0) == "/orchd-abc123-r1-f0"
    assert back.runtime.bell_path(2) == os.path.join(str(tmp_path), "fe2.bell")
    assert back.runtime.engine_addr(0) == f"ipc://{tmp_path}/engine-0.sock"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"ORCHD_QUEUE_POLICY": "fifo"},
            "scheduling.queue_policy: unknown queue_policy 'fifo' (known: 'drop-lru', 'reject')",
        ),
        (
            {"ORCHD_PLACEMENT": "random"},
            "scheduling.placement: unknown placement 'random' "
            "(known: 'default', 'least-loaded', 'round-robin')",
        ),
        (
            {"ORCHD_LOG_LEVEL": "loud"},
            "server.log_level: unknown log_level 'loud' "
            "(known: 'debug', 'error', 'info', 'warning')",
        ),
        (
            {"ORCHD_TRUST_POLICY": "lax"},
            "catalog.trust_policy: unknown trust_policy 'lax' (known: 'permissive', 'strict')",
        ),
        (
            {"ORCHD_ARTIFACT_STORE": "s3"},
            "artifacts.artifact_store: unknown artifact_store 's3' (known: 'fs', 'memory')",
        ),
        ({"ORCHD_GPUS": "all"}, "server.gpus: unknown gpus 'all' (known: '', 'auto')"),
    ],
)
def test_a_name_not_in_its_list_is_refused_with_the_list(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(env=env)
    assert str(e.value) == f"invalid config: {message}"


def test_replica_engine_and_adapter_are_names(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[replicas]]\nid = "a"\n[[replicas]]\nid = "b"\nadapter = "grpc"\n')
    with pytest.raises(ConfigError, match=r"replicas\[1\]\.adapter: unknown adapter 'grpc'"):
        load(str(path), env={})
    path.write_text('[[pools]]\nid = "p"\nengine = "vllm2"\n')
    with pytest.raises(ConfigError, match=r"pools\[0\]\.engine: unknown engine 'vllm2'"):
        load(str(path), env={})
    path.write_text('[[replicas]]\nid = "a"\nengine = "vllm"\n')
    rep = load(str(path), env={}).replicas[0]
    assert (rep.adapter, rep.adapter_name) == ("", "openai")  # "": the engine's default


def test_an_env_value_is_parsed_as_its_fields_type() -> None:
    with pytest.raises(ConfigError, match=r"^ORCHD_PORT: expected an integer, got 'eighty'$"):
        load(env={"ORCHD_PORT": "eighty"})
    with pytest.raises(ConfigError, match=r"ORCHD_STREAM_INTERVAL_MS: expected a number"):
        load(env={"ORCHD_STREAM_INTERVAL_MS": "soon"})
    with pytest.raises(ConfigError, match=r"ORCHD_TRANSCRIPTS: expected true or false"):
        load(env={"ORCHD_TRANSCRIPTS": "maybe"})
    with pytest.raises(ConfigError, match=r"ORCHD_KEY_WEIGHTS: .* set it in the config file"):
        load(env={"ORCHD_KEY_WEIGHTS": "a=1"})
    cfg = load(
        env={"ORCHD_PORT": "9001", "ORCHD_TRANSCRIPTS": "false", "ORCHD_COST_PER_TOKEN": "2"}
    )
    assert (cfg.server.port, cfg.artifacts.transcripts, cfg.sessions.cost_per_token) == (
        9001,
        False,
        2.0,
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[[replicas]]\nid = "a"\n[replicas.mock]\nttft_ms = "5"\n',
            r"^invalid config: replicas\[0\]\.mock\.ttft_ms: expected float, got '5' \(a str, not converted\)$",
        ),
        ('[server]\nport = "8080"\n', r"server\.port: expected int, got '8080'"),
        ("[server]\nport = 80.0\n", r"server\.port: expected int, got 80\.0"),
        ("[limits]\nqueue_capacity = true\n", r"limits\.queue_capacity: expected int, got True"),
        ('[artifacts]\ntranscripts = "yes"\n', r"artifacts\.transcripts: expected bool"),
        ('[server]\napi_keys = "k"\n', r"server\.api_keys: expected array"),
        ('[server]\nlog_level = "verbose"\n', r"server\.log_level: unknown log_level 'verbose'"),
    ],
)
def test_a_wrong_type_in_the_file_is_an_error_not_coerced(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load(str(path), env={})


def test_an_int_is_a_float_field_s_value(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[replicas]]\nid = "a"\n[replicas.mock]\nttft_ms = 5\n')
    assert load(str(path), env={}).replicas[0].mock.ttft_ms == 5.0


@pytest.mark.parametrize("var", ["ORCHD_PROT", "ORCHD_", "ORCHD_REPLICAS", "ORCHD_MOCK"])
def test_an_unknown_orchd_variable_is_refused(var: str) -> None:
    with pytest.raises(
        ConfigError, match=f"unknown environment variable {var} \\(known: ORCHD_CONFIG"
    ):
        load(env={var: "1"})


def test_an_invalid_log_level_from_the_environment_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"server\.log_level: unknown log_level 'loud'"):
        load(env={"ORCHD_LOG_LEVEL": "loud"})


def test_sources_name_file_env_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 9000\nfrontends = 2\n[[replicas]]\nid = "a"\n')
    cfg, sources = load_sourced(
        str(path), env={"ORCHD_FRONTENDS": "3", "ORCHD_QUEUE_CAPACITY": "5"}, cli={"port": 9100}
    )
    assert (cfg.server.port, cfg.server.frontends, cfg.limits.queue_capacity) == (9100, 3, 5)
    assert sources["server.port"] == "flag --port"
    assert sources["server.frontends"] == "env ORCHD_FRONTENDS"
    assert sources["limits.queue_capacity"] == "env ORCHD_QUEUE_CAPACITY"
    assert sources["replicas[0].id"] == f"file {path}"
    assert "limits.ring_bytes" not in sources  # a default


# ---------------------------------------------------------------- keys and roles (issue 13)


@pytest.mark.parametrize("keys", ['[""]', '["  "]', '["ok", ""]', '[{key = " ", role = "client"}]'])
def test_an_empty_or_blank_key_is_a_config_error(tmp_path: Path, keys: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'[server]\nhost = "0.0.0.0"\napi_keys = {keys}\n')
    with pytest.raises(ConfigError, match="empty"):
        load(str(f), env={})


def test_a_bad_sha256_key_or_role_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[server]\napi_keys = ["sha256:abc"]\n')
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        load(str(f), env={})
    f.write_text('[server]\napi_keys = [{key = "k", role = "root"}]\n')
    with pytest.raises(ConfigError, match="role"):
        load(str(f), env={})


def test_keys_with_roles_hashes_and_a_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    digest = hashlib.sha256(b"c2").hexdigest()
    keys.write_text(f"# tenants\nclient c1\nclient sha256:{digest}  # by hash\nadmin ops\n")
    f = tmp_path / "c.toml"
    f.write_text(
        '[server]\nhost = "0.0.0.0"\n'
        'api_keys = ["plain", {key = "t", role = "client", max_streams = 4}]\n'
        f'api_keys_file = "{keys}"\n'
    )
    cfg = load(str(f), env={})
    entries = [key_entry(k) for k in cfg.server.api_keys]
    assert [(e.id, e.role) for e in entries] == [
        (key_id("plain"), "admin"),
        (key_id("t"), "client"),
        (key_id("c1"), "client"),
        (key_id("c2"), "client"),
        (key_id("ops"), "admin"),
    ]
    assert entries[1].max_streams == 4
    # The file's keys reach the resolved config (and so the other processes) only hashed.
    assert "c1" not in msgspec.json.encode(cfg).decode().replace(key_id("c1"), "")


def test_a_keys_file_line_without_a_role_is_an_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("just-a-key\n")
    with pytest.raises(ConfigError, match="line 1"):
        load(env={"ORCHD_API_KEYS_FILE": str(keys)})
