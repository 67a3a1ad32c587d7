#!/usr/bin/env bash
# The GPU-host check (issue 16) in one command; what it runs: perf/gpu_check.py's docstring.
#
#   perf/gpu_check.sh OUT          on a GPU host (Python 3.12 + torch, no network): < 8 minutes
#   perf/gpu_check.sh --cpu OUT    a rehearsal on any machine: every step, small and on the CPU
#
# Before the host is lent: `make gpu-wheels` (on a networked machine) fetches what the host
# lacks into .gpu-wheels/ (cp312 manylinux wheels, < 64 MiB); carry that folder along.
# Writes OUT/gpu-check.json, OUT/gpu-check.txt and OUT/logs/. PYTHON picks the interpreter.
set -euo pipefail

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    echo
    echo "usage: perf/gpu_check.sh [--cpu] [--wheels DIR] [--budget SECONDS] OUT"
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") usage >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    for candidate in "$ROOT/.venv/bin/python" python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
    done
fi
cd "$ROOT"
exec "${PYTHON:?no python found}" -m perf.gpu_check "$@"
