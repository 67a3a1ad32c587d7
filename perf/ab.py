"""A/B: one bench scenario run in turn on several revisions of the tree, so that each change
is judged against its predecessor under the same machine noise (on a shared 2-core machine
two runs of the same code differ by about as much as one small change is worth).

Each revision is checked out once into a temporary directory (``git worktree``) and run with
this checkout's Python environment; rounds alternate A, B, A, B, ... and the summary gives
each headline row's per-run figures (the delta against the run's own baseline where the row
has one, else the value or ratio) and their mean.

    python -m perf.ab HEAD~1 HEAD --only latency --rounds 4
    python -m perf.ab ae751b1 WORKTREE --only latency   # WORKTREE: the uncommitted tree
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def checkout(rev: str, into: Path) -> Path:
    """A directory holding ``rev`` (``WORKTREE``: a copy of the tracked files as they are)."""
    where = into / rev.replace("/", "_")
    if rev == "WORKTREE":
        files = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
        ).stdout.split(b"\0")
        for name in filter(None, files):
            src = ROOT / name.decode()
            if src.is_file():
                dst = where / name.decode()
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    else:
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-f", str(where), rev],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
    return where


def figure(row: dict[str, Any]) -> float | None:
    for key in ("delta", "ratio", "value"):
        if row.get(key) is not None:
            return float(row[key])
    return None


def run_once(tree: Path, bench_args: list[str], out: Path) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "perf.bench", *bench_args, "--out", str(out)],
        cwd=tree, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"perf.bench failed in {tree}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    newest = max(out.glob("bench-*.json"), key=lambda f: f.stat().st_mtime)
    rows: list[dict[str, Any]] = json.loads(newest.read_text())["headline"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("revs", nargs="+", help="git revisions (or WORKTREE), at least two")
    ap.add_argument("--only", default="latency", help="perf.bench scenarios (default latency)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="also write the per-run figures here as JSON")
    a = ap.parse_args()
    if len(a.revs) < 2:
        ap.error("give at least two revisions")
    tmp = Path(tempfile.mkdtemp(prefix="orchd-ab-"))
    trees = {}
    try:
        for rev in a.revs:
            trees[rev] = checkout(rev, tmp)
        runs: dict[str, dict[str, list[float]]] = {rev: {} for rev in a.revs}
        for i in range(a.rounds):
            for rev in a.revs:
                rows = run_once(trees[rev], ["--only", a.only], tmp / "results" / rev)
                for row in rows:
                    v = figure(row)
                    if v is not None:
                        runs[rev].setdefault(row["name"], []).append(v)
                got = {k: v[-1] for k, v in runs[rev].items()}
                print(f"round {i + 1} {rev}: " + "; ".join(f"{k} {v:g}" for k, v in got.items()))
        print("\nmeans (delta over the run's own baseline where the row has one):")
        for name in runs[a.revs[0]]:
            print(f"  {name}")
            for rev in a.revs:
                vals = runs[rev].get(name, [])
                if vals:
                    each = ", ".join(f"{v:g}" for v in vals)
                    print(f"    {rev:>12}: mean {statistics.fmean(vals):.3f}  ({each})")
        if a.out:
            Path(a.out).write_text(json.dumps(runs, indent=2))
    finally:
        for rev, tree in trees.items():
            if rev != "WORKTREE":
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)],
                    cwd=ROOT, capture_output=True,
                )  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
