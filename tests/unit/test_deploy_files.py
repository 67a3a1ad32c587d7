"""The files in deploy/ hold together without a daemon: the alert rules pass promtool and
their unit tests, the dashboard and rules name only series orchd exposes, the systemd unit
verifies, the Dockerfile and compose file are well formed and point at files that exist.
(What they do against a live orchd: tests/integration/test_deploy_*.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchd import config
from tests.support import dashboard as dash
from tests.support.nginx import Nginx
from tests.support.prometheus import PROMTOOL

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"  # Debian's package systemd

ALERTS = {
    "OrchdScrapeDown",
    "OrchdNoReadyReplica",
    "OrchdQueueTimeHigh",
    "OrchdHighRejectionRatio",
    "OrchdEngineRestarts",
    "OrchdGpuMemoryNearFull",
}


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]]


# ---------------------------------------------------------------- Prometheus


def test_promtool_checks_the_rules_and_both_configs() -> None:
    r = run(PROMTOOL, "check", "rules", "alerts.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout
    for cfg in ("prometheus.yml", "prometheus.compose.yml"):
        r = run(PROMTOOL, "check", "config", cfg, cwd=PROM)
        assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_pass() -> None:
    r = run(PROMTOOL, "test", "rules", "alerts.test.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit file holds each rule to its threshold: a changed threshold fails it."""
    shutil.copy(PROM / "alerts.test.yml", tmp_path)
    text = (PROM / "alerts.yml").read_text()
    assert text.count("> 0.95") == 1
    (tmp_path / "alerts.yml").write_text(text.replace("> 0.95", "> 0.97"))
    r = run(PROMTOOL, "test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert r.returncode != 0
    assert "OrchdGpuMemoryNearFull" in r.stdout + r.stderr


def test_every_alert_has_severity_summary_runbook_and_a_firing_unit_test() -> None:
    alerts = [r for r in rules() if "alert" in r]
    assert {a["alert"] for a in alerts} == ALERTS
    for a in alerts:
        assert a["labels"]["severity"] in ("critical", "warning"), a["alert"]
        for key in ("summary", "description", "runbook"):
            assert a["annotations"][key].strip(), (a["alert"], key)
        assert "\n" not in a["annotations"]["runbook"], "a runbook is one line"
    fired = {
        case["alertname"]
        for test in load_yaml(PROM / "alerts.test.yml")["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == ALERTS


def test_the_compose_prometheus_config_differs_only_in_its_target() -> None:
    host, compose = load_yaml(PROM / "prometheus.yml"), load_yaml(PROM / "prometheus.compose.yml")
    assert host["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:8080"]}]
    assert compose["scrape_configs"][0]["static_configs"] == [{"targets": ["orchd:8080"]}]
    for doc in (host, compose):
        doc["scrape_configs"][0]["static_configs"] = []
    assert host == compose


# ---------------------------------------------------------------- the series they name

# PromQL words that are not series names.
_PROMQL = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "le", "inf", "nan",
}  # fmt: skip


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels, keywords dropped)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # dashboard variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        if m[2] is None and m[1].lower() not in _PROMQL:
            names.add(m[1])
    return names


def exposed() -> set[str]:
    """Every series orchd's /metrics carries, by the metrics contract; histograms by their
    _bucket/_sum/_count, plus Prometheus's own ``up``."""
    out = {"up"}
    for m in json.loads((ROOT / "contracts" / "metrics.lint.json").read_text())["metrics"]:
        if m["type"] == "histogram":
            out |= {m["name"] + s for s in ("_bucket", "_sum", "_count")}
        else:
            out.add(m["name"])
    return out


def board() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana" / "orchd-dashboard.json").read_text()))


def test_series_names_parser() -> None:
    assert series_names(
        'histogram_quantile(0.99, sum by (le, pool) (rate(x_bucket{a=~"$a"}[$__rate_interval])))'
        " / on (pool) group_left y offset 5m > bool 2"
    ) == {"x_bucket", "y"}


def test_dashboard_and_alerts_read_only_series_orchd_exposes() -> None:
    exprs = [t.expr for t in dash.targets(board())] + [r["expr"] for r in rules()]
    exprs += [match for _, match, _ in dash.query_variables(board())]
    unknown = {n for e in exprs for n in series_names(e)} - exposed()
    assert not unknown, f"not in contracts/metrics.lint.json: {sorted(unknown)}"


def test_dashboard_covers_what_an_operator_needs() -> None:
    read = {n for t in dash.targets(board()) for n in series_names(t.expr)}
    for needed in (
        "tokens_out_total", "orchd_requests_total",                          # throughput
        "orchd_time_to_first_token_seconds_bucket", "orchd_inter_token_seconds_bucket",
        "orchd_e2e_request_seconds_bucket",                                   # latency
        "queue_depth", "orchd_queue_time_seconds_bucket",                     # queue
        "tasks_rejected_total", "tasks_canceled_total",                       # refusals
        "gpu_utilization", "vram_used_bytes", "vram_total_bytes",             # GPUs
        "orchd_replicas_ready", "replica_ready", "frontend_streams_open",
    ):  # fmt: skip
        assert needed in read, needed


def test_dashboard_is_well_formed() -> None:
    b = board()
    assert b["uid"] and b["title"]
    names = {v["name"] for v in b["templating"]["list"]}
    (ds,) = [v for v in b["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    ids, cells = set(), set()
    for p in b["panels"]:
        assert p["id"] not in ids
        ids.add(p["id"])
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            used = {m[1] or m[2] for m in dash.VARIABLE.finditer(t["expr"])}
            assert used - {"__rate_interval"} <= names, (p["title"], used)
            # Each query's own refId, unique in its panel.
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


# ---------------------------------------------------------------- systemd


def unit_for_verify(tmp_path: Path) -> Path:
    """The shipped unit with its binary path pointed at this venv's real ``orchd`` (verify
    checks that each Exec path is an executable)."""
    orchd_bin = Path(sys.executable).parent / "orchd"
    assert orchd_bin.exists()
    text = (DEPLOY / "systemd" / "orchd.service").read_text()
    unit = tmp_path / "orchd.service"
    unit.write_text(text.replace("/usr/local/bin/orchd", str(orchd_bin)))
    return unit


def test_systemd_unit_verifies_clean(tmp_path: Path) -> None:
    r = run(SYSTEMD_ANALYZE, "verify", str(unit_for_verify(tmp_path)))
    # Unknown keys and bad values are warnings with exit status 0: any output fails too.
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr


def test_systemd_verify_would_catch_a_typo(tmp_path: Path) -> None:
    unit = unit_for_verify(tmp_path)
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restat=on-failure"))
    r = run(SYSTEMD_ANALYZE, "verify", str(unit))
    assert "Unknown key" in r.stderr


def test_systemd_unit_self_checks_restarts_and_is_hardened(tmp_path: Path) -> None:
    keys: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "orchd.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            keys.setdefault(k, []).append(v)
    assert keys["ExecStartPre"] == ["/usr/local/bin/orchd check --config /etc/orchd/orchd.toml"]
    assert keys["ExecStart"] == ["/usr/local/bin/orchd serve --config /etc/orchd/orchd.toml"]
    assert keys["Restart"] == ["on-failure"]
    assert keys["User"] == ["orchd"]
    for k in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert keys[k] in (["yes"], ["strict"]), k
    # systemd's own score of the sandbox: 0 (locked down) .. 10 (none); 2.5 or better here.
    r = run(SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=25",
            str(unit_for_verify(tmp_path)))  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:]
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    assert level is not None and float(level[1]) <= 2.5


# ---------------------------------------------------------------- container


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    assert not pending, "a continuation runs off the end"
    return out


def test_dockerfile_is_well_formed() -> None:
    ins = dockerfile()
    known = {"ARG", "FROM", "RUN", "WORKDIR", "COPY", "USER", "ENV", "EXPOSE", "HEALTHCHECK",
             "STOPSIGNAL", "ENTRYPOINT", "CMD"}  # fmt: skip
    assert {i for i, _ in ins} <= known
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 2  # build stage, runtime stage
    for f in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], f.split()[0])
        assert ":" in image and not image.endswith(":latest"), image
    final = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM") :]
    kinds = [k for k, _ in final]
    user = [a for k, a in final if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert ("EXPOSE", "8080") in final
    assert "HEALTHCHECK" in kinds and "/healthz" in dict(final)["HEALTHCHECK"]
    for k in ("ENTRYPOINT", "CMD"):  # exec form: orchd is PID 1 and gets SIGTERM itself
        assert isinstance(json.loads(dict(final)[k]), list), k
    for k, a in ins:
        if k == "COPY" and not a.startswith("--from"):
            *sources, _dest = a.split()
            for s in sources:
                assert (ROOT / s).exists(), f"COPY {s}: no such file in the build context"


def test_container_config_loads_once_given_keys() -> None:
    path = str(DEPLOY / "docker" / "orchd.toml")
    cfg = config.load(path, env={"ORCHD_API_KEYS": "k1"})
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8080
    with pytest.raises(config.ConfigError, match="API keys"):
        config.load(path, env={})


def test_compose_file_is_well_formed() -> None:
    c = load_yaml(DEPLOY / "compose.yaml")
    services = c["services"]
    assert set(services) == {"orchd", "prometheus", "grafana"}
    assert (DEPLOY / services["orchd"]["build"]["context"] / services["orchd"]["build"][
        "dockerfile"]).resolve() == DEPLOY / "Dockerfile"  # fmt: skip
    for name, s in services.items():
        image = s["image"]
        assert ":" in image and not image.endswith(":latest"), name
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in c["volumes"], f"{name}: named volume {src} not declared"
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert prom_mounts["./prometheus/prometheus.compose.yml"] == "/etc/prometheus/prometheus.yml"
    assert prom_mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    # Prometheus scrapes the orchd service on the port orchd listens on.
    assert "8080:8080" in services["orchd"]["ports"][0]


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    graf = load_yaml(DEPLOY / "compose.yaml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in graf["volumes"])
    prov = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = load_yaml(prov / "dashboards" / "orchd.yaml")["providers"]
    dashboard_in = mounts["./grafana/orchd-dashboard.json"]
    assert Path(dashboard_in).parent == Path(provider["options"]["path"])
    (ds,) = load_yaml(prov / "datasources" / "prometheus.yaml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    scrape = load_yaml(PROM / "prometheus.compose.yml")["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape  # $__rate_interval is right


# ---------------------------------------------------------------- nginx


def test_nginx_site_passes_nginx_t(tmp_path: Path) -> None:
    r = Nginx(tmp_path, upstream_port=8080).check()
    assert r.returncode == 0, r.stderr
    assert "syntax is ok" in r.stderr
