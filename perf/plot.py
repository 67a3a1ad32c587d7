"""The sweep as a picture: throughput and latency percentiles against concurrency."""

from __future__ import annotations

from typing import Any

STYLE = {"orchd": ("tab:blue", "o"), "ceiling": ("tab:green", "s"), "direct": ("tab:gray", "^")}


def sweep_png(runs: dict[str, list[dict[str, Any]]], path: str, title: str) -> bool:
    """Write the PNG; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [
        ("token events/s", [("token_events_per_s", "-", "")]),
        ("requests/s", [("request_throughput", "-", "")]),
        ("TTFT (ms)", [("median_ttft_ms", "-", "p50"), ("p99_ttft_ms", "--", "p99")]),
        (
            "ITL (ms)",
            [("p99_itl_ms", "-", "p99 per token"), ("p99_itl_chunk_ms", "--", "p99 per chunk")],
        ),
        ("TPOT (ms)", [("median_tpot_ms", "-", "p50"), ("p99_tpot_ms", "--", "p99")]),
        ("E2E latency (ms)", [("median_e2el_ms", "-", "p50"), ("p99_e2el_ms", "--", "p99")]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, (ylabel, series) in zip(axes.flat, panels, strict=True):
        for target, rs in runs.items():
            if not rs:
                continue
            color, marker = STYLE.get(target, ("black", "x"))
            by_c: dict[int, list[dict[str, Any]]] = {}
            for r in rs:
                by_c.setdefault(r["concurrency"], []).append(r)
            xs = sorted(by_c)
            for key, ls, what in series:
                ys = [sorted(x[key] for x in by_c[c])[len(by_c[c]) // 2] for c in xs]
                label = f"{target} {what}".strip()
                ax.plot(xs, ys, ls, color=color, marker=marker, label=label)
        levels = sorted({r["concurrency"] for rs in runs.values() for r in rs})
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        if "ms" in ylabel:
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_ylim(bottom=0)
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
