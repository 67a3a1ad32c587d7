"""Issue 11's figures for the OpenAI-compatible routes, each next to its baseline in one run:

- streamed tokens/s through ``/v1/chat/completions`` against orchd's native stream: the same
  orchd, the same load, native and OpenAI runs alternating (target >= 0.9 x);
- the OpenAI path's added TTFT p50 over the direct baseline against the native path's
  (target: within 0.2 ms of it);
- a LiteLLM proxy (one worker) over the same mock engines, per core of server CPU (target:
  orchd >= 100 x). Its upstream is :mod:`perf.oai_upstream`, a bare OpenAI server over the
  mock engine processes: pointing LiteLLM at orchd would charge orchd's own CPU to the
  baseline and tie the figure to orchd; a bare upstream charges LiteLLM for itself only.
  Both sides get the same load (streams x tokens), and both CPU totals include the engines.
"""

from __future__ import annotations

import statistics
import urllib.parse
from typing import TYPE_CHECKING, Any

from perf.direct import Direct
from perf.litellm import MASTER_KEY, LiteLLM, Upstream

if TYPE_CHECKING:
    from perf.scenarios import Bench

UNLIMITED = {"ttft_ms": 0, "itl_ms": 0}


def per_core(run: dict[str, Any], roles: tuple[str, ...] | None = None) -> float:
    """Token events/s per core of server CPU (the named roles' prefixes, or all of them)."""
    cpu = run.get("server_cpu_pct_by_role", {})
    pct = sum(v for k, v in cpu.items() if roles is None or k.startswith(roles))
    return run["token_events_per_s"] / (pct / 100.0) if pct > 0 else 0.0


def run(b: Bench) -> None:
    from perf.scenarios import brief

    p = b.p
    conc = p.headline_conc
    ll_kw: dict[str, Any] = dict(
        concurrency=p.ll_streams, max_tokens=p.ll_tokens, warmup_s=3.0,
        duration_s=max(6.0, p.duration_s),
    )  # fmt: skip
    res: dict[str, Any] = {}
    b.results["openai"] = res

    # 1. Throughput: one orchd, native and OpenAI runs alternating.
    b.say(
        f"[openai] {conc} streams x {p.tokens} tokens, native and /v1/chat/completions "
        f"alternating ({p.oa_rounds} rounds), mock unlimited"
    )
    thr: dict[str, list[dict[str, Any]]] = {"native": [], "openai": []}
    o = b.orchd(UNLIMITED, max(conc, p.ll_streams))
    try:
        for i in range(p.oa_rounds):
            for api in ("native", "openai"):
                r = b.run_orchd(o, b.spec(o.port, "orchd", conc, api=api), f"orchd {api} #{i + 1}")
                r.update(round=i, concurrency=conc)
                thr[api].append(r)
                b.say(f"    {brief(r)}")
        same = b.run_orchd(
            o,
            b.spec(o.port, "orchd", p.ll_streams, api="openai", **ll_kw),
            "orchd openai (LL load)",
        )
        b.say(f"    {brief(same)}")
    finally:
        o.stop()
    res["throughput"] = thr
    ratios = sorted(
        x["token_events_per_s"] / y["token_events_per_s"]
        for x, y in zip(thr["openai"], thr["native"], strict=True)
    )
    med = statistics.median(ratios)
    ov = statistics.median(r["token_events_per_s"] for r in thr["openai"])
    b.row(
        f"OpenAI chat stream tok/s, {conc} streams",
        ov,
        "tok/s",
        baseline=ov / med,
        target=">= 0.9 x native stream",
        met=med >= 0.9,
        note=f"median of per-round ratios {[round(x, 3) for x in ratios]}",
        runs=thr["native"] + thr["openai"],
    )

    # 2. Latency: the paced mock, native and OpenAI alternating, the direct baseline after.
    lat_ttft_and_stamps(b, res)

    # 3. LiteLLM over the same mock engines, per core of server CPU, same load as `same`.
    b.say(
        f"[openai] LiteLLM proxy (1 worker) over {b.replicas} mock engines, "
        f"{p.ll_streams} streams x {p.ll_tokens} tokens"
    )
    res["same_load_orchd"] = same
    up = ll = None
    try:
        up = Upstream(b.replicas, UNLIMITED)
        upr = b.run_pids(
            b.spec(up.port, "upstream", p.ll_streams, api="openai", **ll_kw),
            "bare OpenAI upstream",
            up.pids(),
        )
        b.say(f"    {brief(upr)}  cpu {upr['server_cpu_pct_by_role']}")
        ll = LiteLLM("mock:tiny", up.url, say=b.say)
        llr = b.run_pids(
            b.spec(ll.port, "litellm", p.ll_streams, api="openai", key=MASTER_KEY, **ll_kw),
            "litellm proxy",
            {**ll.pids(), **up.pids()},
        )
        b.say(f"    {brief(llr)}  cpu {llr['server_cpu_pct_by_role']}")
        if llr["failed"]:
            llr["litellm_log_tail"] = ll.log
        res["upstream"], res["litellm"] = upr, llr
    except Exception as e:  # no LiteLLM (no PyPI, say): the other figures still stand
        res["litellm_error"] = f"{type(e).__name__}: {e}"
        b.say(f"    LiteLLM baseline not measured: {res['litellm_error']}")
    finally:
        if ll is not None:
            ll.stop()
        if up is not None:
            up.stop()
    mine = per_core(same)
    if "litellm" in res:
        llr = res["litellm"]
        theirs = per_core(llr)
        b.row(
            f"tok/s per server core vs LiteLLM, {p.ll_streams}x{p.ll_tokens}",
            mine,
            "tok/s/core",
            baseline=theirs,
            target=">= 100 x LiteLLM",
            met=theirs > 0 and mine / theirs >= 100,
            note=f"orchd cpu {same['server_cpu_pct_total']} % ({same['token_events_per_s']:.0f}"
            f" tok/s); litellm {llr['server_cpu_pct_by_role']} ({llr['token_events_per_s']:.0f}"
            " tok/s)",
            runs=[same, llr],
        )
        proxy_only = per_core(llr, ("litellm",))
        b.row(
            "  same, LiteLLM proxy's CPU only",
            mine,
            "tok/s/core",
            baseline=proxy_only,
            note="upstream and engines not charged to LiteLLM",
            runs=[same, llr],
        )
        b.row(
            "  bare OpenAI upstream, same engines",
            per_core(res["upstream"]),
            "tok/s/core",
            how="value",
            note=f"{res['upstream']['token_events_per_s']:.0f} tok/s at "
            f"{res['upstream']['server_cpu_pct_total']} % CPU (no proxy)",
            runs=[res["upstream"]],
        )
    else:
        b.row(
            f"tok/s per server core vs LiteLLM, {p.ll_streams}x{p.ll_tokens}",
            None,
            "tok/s/core",
            target=">= 100 x LiteLLM",
            note=res.get("litellm_error", ""),
        )
    best = statistics.median(per_core(r) for r in thr["openai"])
    theirs = per_core(res["litellm"]) if "litellm" in res else None
    b.row(
        f"  orchd OpenAI at {conc}x{p.tokens} vs LiteLLM at {p.ll_streams}x{p.ll_tokens}",
        best,
        "tok/s/core",
        baseline=theirs,
        how="ratio" if theirs else "value",
        note="each at its own load: LiteLLM is saturated at a few streams, orchd is not",
        runs=thr["openai"] + ([res["litellm"]] if "litellm" in res else []),
    )

    # 4. Any OpenAI-compatible server given by URL: the throughput load, no CPU figures.
    if b.url:
        u = urllib.parse.urlsplit(b.url)
        path = (u.path.rstrip("/") or "") + "/chat/completions"
        spec = b.spec(
            u.port or 80, "url", conc, api="openai", host=u.hostname or "127.0.0.1",
            path=path, key=b.url_key, model=b.url_model,
        )  # fmt: skip
        ur = b.client.run(spec, f"url {b.url}", b.slo)
        ur["label"] = f"url {b.url}"
        res["url"] = ur
        b.say(f"    {brief(ur)}")
        b.row(
            f"{b.url} tok/s, {conc} streams",
            ur["token_events_per_s"],
            "tok/s",
            baseline=ov,
            note="vs orchd's OpenAI route above (another server, another CPU: indicative)",
            runs=[ur],
        )


def lat_ttft_and_stamps(b: Bench, res: dict[str, Any]) -> None:
    """Added TTFT p50 of the OpenAI path against the native path's, over one direct run."""
    from perf.scenarios import brief

    p = b.p
    mock = {"ttft_ms": 0, "itl_ms": p.lat_itl_ms, "stamp_tokens": True}
    req_s = p.lat_tokens * p.lat_itl_ms / 1000.0
    kw: dict[str, Any] = dict(
        max_tokens=p.lat_tokens, ramp_s=req_s, warmup_s=2 * req_s + 0.5,
        duration_s=p.lat_duration_s, stamps=True,
    )  # fmt: skip
    b.say(
        f"[openai] latency: {p.lat_streams} streams at {1000 / p.lat_itl_ms:.0f} tok/s, "
        f"native and OpenAI alternating ({p.oa_lat_rounds} rounds), then direct"
    )
    lat: dict[str, list[dict[str, Any]]] = {"native": [], "openai": []}
    o = b.orchd(mock, p.lat_streams)
    try:
        for i in range(p.oa_lat_rounds):
            for api in ("native", "openai"):
                spec = b.spec(o.port, "orchd", p.lat_streams, api=api, **kw)
                r = b.run_orchd(o, spec, f"orchd {api} paced #{i + 1}")
                r["round"] = i
                lat[api].append(r)
                b.say(f"    {brief(r)}")
    finally:
        o.stop()
    with Direct(b.replicas, mock) as d:
        dr = d.run(b.spec(0, "direct", p.lat_streams, **kw), "direct", b.slo)
        dr["label"] = "direct paced"
    b.say(f"    {brief(dr)}")
    res["latency"] = {**lat, "direct": dr}
    base = dr["median_ttft_ms"]
    nat = statistics.mean(r["median_ttft_ms"] for r in lat["native"])
    oai = statistics.mean(r["median_ttft_ms"] for r in lat["openai"])
    added_nat, added_oa = nat - base, oai - base
    b.row(
        f"OpenAI added TTFT p50, {p.lat_streams} streams",
        oai,
        "ms",
        baseline=base,
        how="delta",
        target="within +0.2 ms of native's",
        met=added_oa - added_nat <= 0.2,
        note=f"native path +{added_nat:.3f} ms in the same run; OpenAI - native "
        f"{added_oa - added_nat:+.3f} ms",
        runs=lat["native"] + lat["openai"] + [dr],
    )
    b.row(
        f"  native added TTFT p50, {p.lat_streams} streams",
        nat,
        "ms",
        baseline=base,
        how="delta",
        runs=lat["native"] + [dr],
    )
    for api in ("native", "openai"):
        st = [
            r["median_engine_to_client_ms"] for r in lat[api] if "median_engine_to_client_ms" in r
        ]
        if st:
            b.row(
                f"  {api} engine write -> client receipt p50",
                statistics.mean(st),
                "ms",
                baseline=dr.get("median_engine_to_client_ms", 0.0),
                how="delta",
                runs=lat[api],
            )
