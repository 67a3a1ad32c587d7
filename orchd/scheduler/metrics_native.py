"""The Prometheus-native series (``orchd_*``: seconds, ``_total`` counters, ``promtool``-clean),
and every frontend's own series, rendered from what the scheduler holds.

- histograms by ``{model, pool}``: time to first token (from arrival), queue time,
  inter-token time (one observation per token record, not per token), end-to-end time,
  prompt and generated tokens per request;
- ``orchd_requests_total{model, pool, outcome}`` (ok | error | canceled | rejected),
  ``orchd_replicas_ready{pool}``, ``orchd_engine_restarts_total{pool, replica}``;
- ``orchd_build_info{version, python, git_sha}`` (value 1);
- ``frontend_streams_open``, ``frontend_client_disconnects_total``,
  ``frontend_stream_overflows_total``, labelled ``frontend``: every frontend's latest report
  (``FrontendStats``), so a scrape shows them all whichever frontend answers it.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric

import orchd
from ipc import protocol as p
from orchd.build_info import git_sha
from orchd.core.scheduler import SchedulerCore
from orchd.core.series import Hist, Key

NATIVE = ["model", "pool"]
HISTOGRAMS = (
    ("ttft_s", "orchd_time_to_first_token_seconds", "Arrival to first token, per request."),
    ("queue_s", "orchd_queue_time_seconds", "Arrival to dispatch, per request."),
    (
        "inter_token_s",
        "orchd_inter_token_seconds",
        "Time per token between token records, observed once per record (batch).",
    ),
    ("e2e_s", "orchd_e2e_request_seconds", "Arrival to end, per request."),
    ("prompt_tokens", "orchd_request_prompt_tokens", "Prompt tokens per request."),
    ("generation_tokens", "orchd_request_generation_tokens", "Generated tokens per request."),
)


def histogram(
    name: str, doc: str, labels: Sequence[str], hists: dict[Key, Hist]
) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    for key, h in sorted(hists.items()):
        cum, buckets = 0, []
        for bound, n in zip([*h.bounds, float("inf")], h.counts, strict=True):
            cum += n
            buckets.append(("+Inf" if bound == float("inf") else _num(bound), cum))
        fam.add_metric(list(key), buckets, h.total)
    return fam


def _num(v: float) -> str:
    return repr(float(v))


def counter(name: str, doc: str, labels: Sequence[str], values: dict[Key, int]) -> Metric:
    fam = CounterMetricFamily(name, doc, labels=list(labels))
    for key, n in sorted(values.items()):
        fam.add_metric(list(key), n)
    return fam


class NativeCollector:
    def __init__(self, core: SchedulerCore) -> None:
        self.core = core
        self.build = (orchd.__version__, platform.python_version(), git_sha())
        self.frontends: dict[int, p.FrontendStats] = {}

    def frontend_stats(self, msg: p.FrontendStats) -> None:
        self.frontends[msg.frontend] = msg

    def frontend_gone(self, index: int) -> None:
        self.frontends.pop(index, None)

    def collect(self) -> Iterator[Metric]:
        s = self.core.series
        for attr, name, doc in HISTOGRAMS:
            yield histogram(name, doc, NATIVE, getattr(s, attr))
        yield counter("orchd_requests", "Requests by outcome.", [*NATIVE, "outcome"], s.requests)
        yield counter(
            "orchd_engine_restarts",
            "Engine restarts: its supervisor came back, or it fell out of ready with an error.",
            ["pool", "replica"],
            s.engine_restarts,
        )
        ready = GaugeMetricFamily("orchd_replicas_ready", "Replicas taking work.", labels=["pool"])
        for pool in sorted(self.core.pools.pools.values(), key=lambda x: x.id):
            n = sum(1 for r in pool.replicas if self.core.replicas[r].ready)
            ready.add_metric([s.f("pool_id", pool.id)], n)
        yield ready
        info = GaugeMetricFamily(
            "orchd_build_info", "orchd's build (value 1).", labels=["version", "python", "git_sha"]
        )
        info.add_metric(list(self.build), 1)
        yield info
        yield from self._frontends()

    def _frontends(self) -> Iterator[Metric]:
        fl = ["frontend"]
        opened = GaugeMetricFamily("frontend_streams_open", "Open SSE streams.", labels=fl)
        left = CounterMetricFamily(
            "frontend_client_disconnects", "Streams whose client left before the end.", labels=fl
        )
        over = CounterMetricFamily(
            "frontend_stream_overflows",
            "Streams cut off because their client read too slowly.",
            labels=fl,
        )
        for i, f in sorted(self.frontends.items()):
            opened.add_metric([str(i)], f.streams_open)
            left.add_metric([str(i)], f.client_disconnects)
            over.add_metric([str(i)], f.stream_overflows)
        yield from (opened, left, over)
