"""The queries of a Grafana dashboard JSON, made runnable against Prometheus's API: the
panels' targets and the template variables, with ``$var`` / ``${var}`` and Grafana's
``$__rate_interval`` substituted as Grafana would (https://grafana.com/docs/grafana/latest/dashboards/variables/)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

LABEL_VALUES = re.compile(r"^label_values\((?P<match>.+),\s*(?P<label>\w+)\)$")
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass(frozen=True)
class Target:
    panel: str
    ref_id: str
    expr: str


def targets(dashboard: dict[str, Any]) -> list[Target]:
    """Every query target of every panel, rows' nested panels included."""
    out: list[Target] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append(Target(p["title"], t["refId"], t["expr"]))

    walk(dashboard["panels"])
    return out


def query_variables(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(name, match, label)`` of each ``label_values(match, label)`` variable, in order."""
    out = []
    for v in dashboard["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = LABEL_VALUES.match(q)
        if m is None:
            raise ValueError(f"variable {v['name']}: only label_values(...) is supported: {q!r}")
        out.append((v["name"], m["match"], m["label"]))
    return out


def regex_of(values: list[str]) -> str:
    """A multi-value variable as Grafana interpolates it into ``=~"..."``: ``(a|b)``, each
    regex metacharacter escaped, and the backslash doubled for the PromQL string literal."""
    return "(" + "|".join(re.sub(r"([\\.+*?()\[\]{}|^$])", r"\\\\\1", v) for v in values) + ")"


def substitute(expr: str, values: dict[str, str], rate_interval: str) -> str:
    """``expr`` with each ``$name`` replaced; an unknown variable is an error."""

    def one(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        if name == "__rate_interval":
            return rate_interval
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return VARIABLE.sub(one, expr)


def rate_interval(scrape_s: float, step_s: float) -> str:
    """Grafana's ``$__rate_interval``: max(step + scrape interval, 4 x scrape interval)."""
    return f"{max(step_s + scrape_s, 4 * scrape_s):g}s"
