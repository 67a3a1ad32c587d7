"""Run the shipped Prometheus config and alert rules in a real Prometheus against a test's
orchd, and ask it things through its HTTP API (https://prometheus.io/docs/prometheus/latest/querying/api/).

What changes from the shipped files, and only that: the scrape target (the test's port), the
scrape and evaluation intervals (1 s, so a test sees data in seconds), and every alert's
``for`` (1 s: the shipped durations are proven by ``promtool test rules``)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import yaml

from tests.support.ports import free_port
from tests.support.wait import wait_for

PROMETHEUS = "/usr/bin/prometheus"  # Debian's package prometheus
PROMTOOL = "/usr/bin/promtool"  # same package
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
READY_TIMEOUT_S = 30.0
TEST_INTERVAL = "1s"
TEST_FOR = "1s"


def fast_rules(rules_text: str) -> str:
    """The shipped alert rules with every ``for`` set to ``TEST_FOR``."""
    doc = yaml.safe_load(rules_text)
    for group in doc["groups"]:
        group["interval"] = TEST_INTERVAL
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = TEST_FOR
    return str(yaml.safe_dump(doc, sort_keys=False))


def fast_config(config_text: str, target: str, rules_path: Path) -> str:
    """The shipped scrape config aimed at ``target``, fast, with the test's rule file."""
    doc = yaml.safe_load(config_text)
    doc["global"]["scrape_interval"] = TEST_INTERVAL
    doc["global"]["evaluation_interval"] = TEST_INTERVAL
    doc["rule_files"] = [str(rules_path)]
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "orchd"]
    (static,) = job["static_configs"]
    static["targets"] = [target]
    return str(yaml.safe_dump(doc, sort_keys=False))


class Prometheus:
    """A Prometheus server on a free loopback port, its TSDB under ``workdir``."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.workdir = workdir
        rules = workdir / "alerts.yml"
        rules.write_text(fast_rules((DEPLOY / "alerts.yml").read_text()))
        self.config = workdir / "prometheus.yml"
        self.config.write_text(fast_config((DEPLOY / "prometheus.yml").read_text(), target, rules))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None
        self.http = httpx.Client(base_url=self.base, timeout=10.0)

    def start(self) -> Prometheus:
        self._log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        try:
            wait_for(self._ready, READY_TIMEOUT_S, "Prometheus to be ready")
        except BaseException:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log()}")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return True  # exited: start() reports it
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.http.close()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ the HTTP API

    def api(self, path: str, **params: Any) -> Any:
        r = self.http.get(f"/api/v1/{path}", params=params)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {r.status_code} {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        return list(data["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        return sorted(self.api(f"label/{label}/values", **{"match[]": match}))

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """The alerts named ``name`` now pending or firing."""
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]
