"""A progress bar on stderr for one run: tqdm when the `bench` extra is installed, else a
plain one-line bar."""

from __future__ import annotations

import shutil
import sys
from typing import Any


class Bar:
    def __init__(self, label: str, total_s: float) -> None:
        self.label = label
        self.total = total_s
        self.last = (0.0, 0.0)
        self.rate = 0.0
        self._tqdm: Any = None
        try:
            from tqdm import tqdm

            size = shutil.get_terminal_size((100, 20))  # a pty may say 0 x 0: tqdm then hides
            self._tqdm = tqdm(
                ncols=min(size.columns or 100, 120),
                nrows=size.lines or 20,
                total=round(total_s, 1),
                desc=f"{label:<28}",
                unit="s",
                bar_format="{desc} {bar:20} {n:5.1f}/{total:.0f}s{postfix}",
                file=sys.stderr,
                leave=False,
                disable=not sys.stderr.isatty(),
            )
        except ImportError:
            pass

    def update(self, elapsed: float, tokens: float, done: float, draining: bool) -> None:
        t0, k0 = self.last
        if elapsed - t0 < 0.25:
            return
        if elapsed > t0:
            self.rate = (tokens - k0) / (elapsed - t0)
        self.last = (elapsed, tokens)
        shown = min(max(elapsed, 0.0), self.total)
        post = f"{self.rate:>9.0f} tok/s  {int(done):>6} req" + ("  draining" if draining else "")
        if self._tqdm is not None:
            self._tqdm.n = round(shown, 1)
            self._tqdm.set_postfix_str(post, refresh=True)
        elif sys.stderr.isatty():
            filled = int(20 * shown / self.total) if self.total else 20
            sys.stderr.write(f"\r{self.label:<28} [{'#' * filled:<20}] {shown:5.1f}s {post}")
            sys.stderr.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif sys.stderr.isatty():
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
