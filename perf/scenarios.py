"""The scenarios of issue 4, each measured next to its baseline in the same run.

Every scenario stores its runs (vLLM-keyed dicts, perf/metrics.py) under ``Bench.results`` and
adds headline rows: a measured value, the baseline it is divided by (or subtracted from), the
issue's target, and whether this run met it. The figures are measured, never tuned for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from perf.direct import Direct
from perf.loadgen import LoadClient, LoadSpec
from perf.procs import Ceiling, CpuSampler, Orchd, orchd_config

UNLIMITED = {"ttft_ms": 0, "itl_ms": 0}
SUMMARY_KEYS = (
    "label", "completed", "failed", "rejected", "token_events_per_s", "request_throughput",
    "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "p99_itl_chunk_ms",
    "median_tpot_ms", "p99_e2el_ms", "tokens_per_chunk", "client_cpu_cores", "client_saturated",
)  # fmt: skip


@dataclass
class Profile:
    name: str
    sweep: list[int]  # concurrency levels, unlimited-rate mock
    tokens: int  # max_tokens of the throughput runs
    warmup_s: float
    duration_s: float
    rounds: int  # alternating ceiling/orchd rounds at the headline concurrency
    headline_conc: int = 256
    lat_streams: int = 64
    lat_itl_ms: float = 20.0
    lat_tokens: int = 100
    lat_duration_s: float = 5.0
    admit_workers: int = 32
    admit_duration_s: float = 3.0
    idle_replicas: int = 8
    idle_s: float = 10.0
    scale_frontends: list[int] = field(default_factory=lambda: [1, 2])
    mem_streams: list[int] = field(default_factory=lambda: [1000])
    soak_s: float = 0.0  # 0: skipped
    arrivals: list[tuple[float, float]] = field(default_factory=list)  # (x capacity, burstiness)
    # openai: alternating native/OpenAI rounds (throughput and latency), and the LiteLLM load
    oa_rounds: int = 3
    oa_lat_rounds: int = 1
    # LiteLLM streams a few hundred tokens/s here: requests short enough to end in the window
    ll_streams: int = 8
    ll_tokens: int = 100


PROFILES = {
    "quick": Profile("quick", [16, 64, 256], 500, 1.0, 3.0, 1, arrivals=[(0.5, 1.0)]),
    "full": Profile(
        "full",
        [1, 4, 16, 64, 128, 256, 512],
        2000,
        2.0,
        8.0,
        3,
        lat_duration_s=20.0,
        admit_duration_s=8.0,
        oa_rounds=5,
        oa_lat_rounds=2,
        idle_s=60.0,
        scale_frontends=[1, 2, 4],
        mem_streams=[1000, 2000, 4000],
        soak_s=600.0,
        arrivals=[(0.25, 1.0), (0.5, 1.0), (0.8, 1.0), (0.5, 0.25)],
    ),  # fmt: skip
}


def invalid(run: dict[str, Any]) -> str:
    """Why a run's figures cannot be trusted ("" if they can): nothing completed, or more
    than 1% of its cohort failed."""
    n, failed = run.get("num_prompts", 0), run.get("failed", 0)
    if run.get("completed", 0) == 0 or failed > 0.01 * max(n, 1):
        errs = run.get("errors") or {}
        return f"{run.get('label', '?')}: {failed} of {n} failed {errs}"
    return ""


def brief(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in SUMMARY_KEYS if k in run}


class Bench:
    def __init__(
        self,
        profile: Profile,
        client: LoadClient,
        slo: dict[str, float],
        replicas: int = 2,
        coalesce: dict[str, Any] | None = None,
        say: Any = print,
        api: str = "native",
        url: str | None = None,
        url_key: str = "dev",
        url_model: str = "mock:tiny",
    ) -> None:
        self.p = profile
        self.client = client
        self.slo = slo
        self.replicas = replicas
        self.coalesce = coalesce
        self.say = say
        self.api = api  # "openai": the stream scenarios drive orchd's /v1/chat/completions
        self.url, self.url_key, self.url_model = url, url_key, url_model
        self.results: dict[str, Any] = {}
        self.headline: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- helpers

    def row(
        self,
        name: str,
        value: float | None,
        unit: str,
        *,
        baseline: float | None = None,
        how: str = "ratio",  # "ratio" (value / baseline) | "delta" (value - baseline) | "value"
        target: str = "",
        met: bool | None = None,
        note: str = "",
        runs: list[dict[str, Any]] | None = None,
    ) -> None:
        bad = [why for r in runs or [] if (why := invalid(r))]
        if bad:  # a figure from a broken run is reported, never scored
            met = None
            note = "INVALID: " + "; ".join(bad) + (f"; {note}" if note else "")
        r: dict[str, Any] = {
            "name": name,
            "value": None if value is None else round(value, 3),
            "unit": unit,
        }
        if value is None:  # not measured in this run: say so, never print a made-up 0
            r.update(target=target, met=None, note=note)
            self.headline.append(r)
            self.say(f"  {name:<44} {'not run':>12}            target {target or '-'}  {note}")
            return
        if baseline is not None:
            r["baseline"] = round(baseline, 3)
            if how == "ratio":
                r["ratio"] = round(value / baseline, 3) if baseline else None
            else:
                r["delta"] = round(value - baseline, 3)
        r.update(target=target, met=met, note=note)
        self.headline.append(r)
        shown = (
            f"ratio {r['ratio']}"
            if "ratio" in r
            else (f"delta {r['delta']:+.3f} {unit}" if "delta" in r else "")
        )
        base = f" vs {r['baseline']:.6g}" if baseline is not None else ""
        mark = {True: "met", False: "NOT met", None: "-"}[met]
        self.say(
            f"  {name:<44} {value:>12.6g} {unit:<9}{base:<16} {shown:<22} "
            f"target {target or '-'} [{mark}]{'  ' + note if note else ''}"
        )

    def orchd(self, mock: dict[str, Any], slots: int, frontends: int = 1, **kw: Any) -> Orchd:
        extra = kw.pop("extra", None)
        return Orchd(orchd_config(self.replicas, slots, mock, extra, **kw), frontends)

    def spec(self, port: int, target: str, conc: int, **kw: Any) -> LoadSpec:
        p = self.p
        args: dict[str, Any] = dict(
            port=port, target=target, concurrency=conc, max_tokens=p.tokens,
            warmup_s=p.warmup_s, duration_s=p.duration_s,
        )  # fmt: skip
        if target == "orchd" and self.api == "openai" and kw.get("mode", "closed") != "admit":
            args["api"] = "openai"
        args.update(kw)
        return LoadSpec(**args)

    def run_orchd(self, o: Orchd, spec: LoadSpec, label: str) -> dict[str, Any]:
        if spec.api == "openai" and "openai" not in label:
            label += " (openai)"
        s = CpuSampler(o)
        r = self.client.run(spec, label, self.slo, hooks=s)
        r["label"] = label
        r["server_cpu_pct_by_role"] = s.by_role()
        r["server_cpu_pct_total"] = s.total()
        if r["failed"]:
            r["orchd_log_tail"] = list(o.log)
        return r

    def run_plain(self, port: int, spec: LoadSpec, label: str, pid: int) -> dict[str, Any]:
        return self.run_pids(spec, label, {pid: "ceiling"})

    def run_pids(self, spec: LoadSpec, label: str, pids: dict[int, str]) -> dict[str, Any]:
        """A run against a server that is not orchd, its CPU per process (pid -> role)."""
        s = CpuSampler(None, pids)
        r = self.client.run(spec, label, self.slo, hooks=s)
        r["label"] = label
        r["server_cpu_pct_by_role"] = s.by_role()
        r["server_cpu_pct_total"] = s.total()
        return r

    # ---------------------------------------------------------------- scenarios

    def sweep(self) -> None:
        """Concurrency sweep at unlimited engine rate: orchd, ceiling and direct at each level;
        extra alternating rounds at the headline concurrency."""
        p = self.p
        self.say(f"[sweep] concurrency {p.sweep}, {p.tokens} tokens/request, mock unlimited")
        runs: dict[str, list[dict[str, Any]]] = {"orchd": [], "ceiling": [], "direct": []}
        c = Ceiling()
        o = self.orchd(UNLIMITED, max(p.sweep))
        d = Direct(self.replicas, UNLIMITED)
        try:
            for conc in p.sweep:
                rounds = p.rounds if conc == p.headline_conc else 1
                for i in range(rounds):
                    sfx = f" c={conc}" + (f" #{i + 1}" if rounds > 1 else "")
                    cr = self.run_plain(
                        c.port, self.spec(c.port, "ceiling", conc), "ceiling" + sfx, c.proc.pid
                    )
                    orr = self.run_orchd(o, self.spec(o.port, "orchd", conc), "orchd" + sfx)
                    for k, r in (("ceiling", cr), ("orchd", orr)):
                        r["concurrency"] = conc
                        r["round"] = i
                        runs[k].append(r)
                        self.say(f"    {brief(r)}")
                dr = d.run(self.spec(0, "direct", conc), f"direct c={conc}", self.slo)
                dr.update(label=f"direct c={conc}", concurrency=conc, round=0)
                runs["direct"].append(dr)
                self.say(f"    {brief(dr)}")
        finally:
            d.close()
            o.stop()
            c.stop()
        self.results["sweep"] = runs
        hc = [r for r in runs["ceiling"] if r["concurrency"] == p.headline_conc]
        ho = [r for r in runs["orchd"] if r["concurrency"] == p.headline_conc]
        if hc and ho:
            ratios = sorted(
                o_["token_events_per_s"] / c_["token_events_per_s"]
                for o_, c_ in zip(ho, hc, strict=True)
            )
            med = ratios[len(ratios) // 2]
            ov = sorted(r["token_events_per_s"] for r in ho)[len(ho) // 2]
            self.row(
                f"stream tok events/s, 1 fe, {p.headline_conc} streams",
                ov,
                "ev/s",
                baseline=ov / med,
                target=">= 0.8 x ceiling",
                met=med >= 0.8,
                note=f"ratios per round {[round(x, 2) for x in ratios]}",
                runs=ho + hc,
            )
            dh = [r for r in runs["direct"] if r["concurrency"] == p.headline_conc]
            if dh:
                self.row(
                    "  engine alone (direct), same concurrency",
                    dh[0]["token_events_per_s"],
                    "ev/s",
                    how="value",
                    note="the mock engine's own rate, read by a bare ZeroMQ driver using "
                    f"{dh[0]['client_cpu_cores']} of a core"
                    + (" (the driver may be the limit)" if dh[0]["client_saturated"] else ""),
                    runs=dh,
                )

    def coalesced(self) -> None:
        p = self.p
        if not self.coalesce:
            self.say("[coalesce] skipped: no coalescing setting given (--coalesce-toml)")
            self.results["coalesce"] = {"skipped": "no --coalesce-toml given"}
            self.row(
                "stream tok events/s with coalescing",
                None,
                "ev/s",
                target=">= 2 x ceiling",
                note="not run: orchd has no stream_interval-style setting yet",
            )
            return
        self.say(f"[coalesce] orchd with extra config {self.coalesce}")
        c = Ceiling()
        o = self.orchd(UNLIMITED, p.headline_conc, extra=self.coalesce)
        conc = p.headline_conc
        try:
            cr = self.run_plain(c.port, self.spec(c.port, "ceiling", conc), "ceiling", c.proc.pid)
            orr = self.run_orchd(o, self.spec(o.port, "orchd", conc), "orchd coalesced")
        finally:
            o.stop()
            c.stop()
        self.results["coalesce"] = {"extra_config": self.coalesce, "runs": [cr, orr]}
        ratio = orr["token_events_per_s"] / cr["token_events_per_s"]
        self.row(
            f"stream tok events/s coalesced, {conc} streams",
            orr["token_events_per_s"],
            "ev/s",
            baseline=cr["token_events_per_s"],
            target=">= 2 x ceiling",
            met=ratio >= 2.0,
            runs=[cr, orr],
        )

    def latency(self) -> None:
        p = self.p
        mock = {"ttft_ms": 0, "itl_ms": p.lat_itl_ms, "stamp_tokens": True}
        rate = 1000.0 / p.lat_itl_ms
        self.say(
            f"[latency] {p.lat_streams} streams x {rate:.0f} tok/s, {p.lat_tokens} tokens: "
            "orchd vs direct (same engines, same arrivals)"
        )
        # Workers start evenly over one request's length, so arrivals are steady (not one
        # burst of 64 every request length); the warm-up covers the ramp and one request.
        req_s = p.lat_tokens * p.lat_itl_ms / 1000.0
        kw = dict(
            max_tokens=p.lat_tokens, ramp_s=req_s, warmup_s=2 * req_s + 0.5,
            duration_s=p.lat_duration_s,
        )  # fmt: skip
        o = self.orchd(mock, p.lat_streams)
        try:
            orr = self.run_orchd(
                o, self.spec(o.port, "orchd", p.lat_streams, stamps=True, **kw), "orchd paced"
            )
        finally:
            o.stop()
        with Direct(self.replicas, mock) as d:
            dr = d.run(self.spec(0, "direct", p.lat_streams, stamps=True, **kw), "direct", self.slo)
            dr["label"] = "direct paced"
        self.results["latency"] = {"orchd": orr, "direct": dr}
        for r in (orr, dr):
            self.say(f"    {brief(r)}")
        for key, name, target, limit in (
            ("median_ttft_ms", "TTFT p50", "<= +1 ms over direct", 1.0),
            ("p99_ttft_ms", "TTFT p99", "<= +5 ms over direct", 5.0),
            ("p99_itl_ms", "ITL p99", "<= +2 ms over direct", 2.0),
        ):
            self.row(
                f"added latency {name}, {p.lat_streams} streams",
                orr[key],
                "ms",
                baseline=dr[key],
                how="delta",
                target=target,
                met=orr[key] - dr[key] <= limit,
                runs=[orr, dr],
            )
        if "p99_engine_to_client_ms" in orr:
            self.row(
                "engine write -> client receipt p50",
                orr["median_engine_to_client_ms"],
                "ms",
                baseline=dr.get("median_engine_to_client_ms", 0.0),
                how="delta",
                note="baseline: engine -> bare ZeroMQ driver",
                runs=[orr, dr],
            )
            self.row(
                "engine write -> client receipt p99",
                orr["p99_engine_to_client_ms"],
                "ms",
                baseline=dr.get("p99_engine_to_client_ms", 0.0),
                how="delta",
                runs=[orr, dr],
            )

    def admission(self) -> None:
        p = self.p
        self.say(f"[admission] POST /v1/tasks, {p.admit_workers} keep-alive clients back to back")
        kw = dict(mode="admit", warmup_s=1.0, duration_s=p.admit_duration_s)
        c = Ceiling()
        try:
            cr = self.run_plain(
                c.port,
                self.spec(c.port, "ceiling", p.admit_workers, **kw),
                "ceiling POST",
                c.proc.pid,
            )
        finally:
            c.stop()
        # Admitted tasks never produce a token (ttft huge), so only admission costs CPU.
        slow = {"ttft_ms": 1e9, "itl_ms": 0}
        o = self.orchd(slow, 64, queue_capacity=1_000_000)
        try:
            orr = self.run_orchd(o, self.spec(o.port, "orchd", p.admit_workers, **kw), "orchd POST")
        finally:
            o.stop()
        self.results["admission"] = {"ceiling": cr, "orchd": orr}
        for r in (cr, orr):
            self.say(
                f"    {r['label']}: {r['request_throughput']:.0f} req/s accepted, rejected "
                f"{r['rejected']}, failed {r['failed']}, POST p50 {r['median_e2el_ms']:.2f} ms "
                f"p99 {r['p99_e2el_ms']:.2f} ms, client cpu {r['client_cpu_cores']}"
            )
        ratio = orr["request_throughput"] / cr["request_throughput"]
        self.row(
            "admission POST req/s",
            orr["request_throughput"],
            "req/s",
            baseline=cr["request_throughput"],
            target=">= 0.6 x bare starlette",
            met=ratio >= 0.6,
            runs=[cr, orr],
        )

    def arrivals(self, capacity_rps: float) -> None:
        """Open-loop Poisson / bursty arrivals at fractions of the measured capacity."""
        p = self.p
        if not p.arrivals or capacity_rps <= 0:
            return
        self.say(f"[arrivals] open loop, capacity {capacity_rps:.1f} req/s (sweep, 1 frontend)")
        o = self.orchd(UNLIMITED, p.headline_conc * 2)
        out = []
        try:
            for frac, burst in p.arrivals:
                rate = frac * capacity_rps
                spec = self.spec(
                    o.port, "orchd", 0, mode="rate", request_rate=rate, burstiness=burst
                )
                label = f"orchd {rate:.0f} req/s b={burst}"
                r = self.run_orchd(o, spec, label)
                r["capacity_fraction"] = frac
                out.append(r)
                self.say(f"    {brief(r)}  goodput {r['request_goodput']:.1f} req/s")
        finally:
            o.stop()
        self.results["arrivals"] = out

    def scale_out(self) -> None:
        p = self.p
        cores = __import__("os").cpu_count() or 1
        conc = p.headline_conc
        self.say(f"[scale-out] frontends {p.scale_frontends}, {conc} streams, {cores} cores")
        runs = []
        for n in p.scale_frontends:
            o = self.orchd(UNLIMITED, conc, frontends=n)
            try:
                time.sleep(0.5)
                r = self.run_orchd(o, self.spec(o.port, "orchd", conc), f"orchd {n} frontends")
                r["frontends"] = n
                runs.append(r)
                self.say(f"    {brief(r)}")
            finally:
                o.stop()
        self.results["scale_out"] = {"cores": cores, "runs": runs}
        one = runs[0]["token_events_per_s"]
        for r in runs[1:]:
            owed = cores < 16
            self.row(
                f"scale-out {r['frontends']} fe / 1 fe tok events/s",
                r["token_events_per_s"],
                "ev/s",
                baseline=one,
                target=">= 3x at 4 fe on 16 cores" if r["frontends"] == 4 else "",
                met=None if owed or r["frontends"] != 4 else r["token_events_per_s"] >= 3 * one,
                note=f"{cores}-core host: the 16-core run is still owed" if owed else "",
                runs=[runs[0], r],
            )
