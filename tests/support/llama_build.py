"""Build llama.cpp's native ``llama-server`` for the test suite, once per venv and version.

The source is the llama.cpp that ``llama-cpp-python`` vendors in its sdist on PyPI (PyPI is the
one registry we reach; nothing comes from a git host). We build the native server, not the
package's Python ``llama_cpp.server``: the native one serves both APIs orchd's adapters speak
(``/completion`` for ``llamacpp``, ``/v1/completions`` for ``openai``) and shows its own state
(``/slots``, ``/metrics``, ``/tokenize``), which is what lets a test prove the engine stopped.

``python -m tests.support.llama_build`` (what ``make test`` runs) does nothing when the binary for
the pinned version is already in ``<venv>/llama.cpp/<version>/``; else it downloads the sdist
with pip, configures with cmake (a CPU build, static, no web UI, no network at build time) and
builds the one target, about 10 minutes on 2 cores. cmake comes from PATH, else from PyPI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# The llama.cpp we test against: llama-cpp-python's sdist vendors one llama.cpp commit.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary, copied out of the build tree
    "-DGGML_NATIVE=OFF",  # the same code on any x86-64 this venv moves to
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",  # the web UI needs npm ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... or a download from a model hub: neither here
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_NUMBER=0",
    f"-DLLAMA_BUILD_COMMIT=llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}",
]


def install_dir(prefix: str | None = None) -> Path:
    return Path(prefix or sys.prefix) / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION


def server_path(prefix: str | None = None) -> Path:
    return install_dir(prefix) / "llama-server"


def _run(argv: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        rc = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"{argv[0]} failed ({rc}); last lines of {log}:\n" + "\n".join(tail))


def _cmake() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    _run([sys.executable, "-m", "pip", "install", "-q", "cmake"], Path(os.devnull))
    return str(Path(sys.executable).parent / "cmake")


def build(jobs: int) -> Path:
    dest = server_path()
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log = dest.parent / "build.log"
    log.write_text("")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
        work = Path(tmp)
        print(f"llama.cpp: fetching llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (sdist)")
        spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
        pip = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary=llama-cpp-python",
        ]
        _run([*pip, "-d", str(work), spec], log)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        t1 = time.monotonic()
        print(f"llama.cpp: building llama-server with {jobs} jobs (log: {log})")
        cmake = _cmake()
        _run([cmake, "-S", str(src), "-B", str(work / "build"), *CMAKE_FLAGS], log)
        _run(
            [cmake, "--build", str(work / "build"), "--target", "llama-server", "-j", str(jobs)],
            log,
        )
        built = work / "build" / "bin" / "llama-server"
        tmp_dest = dest.with_suffix(".tmp")
        shutil.copy2(built, tmp_dest)
        tmp_dest.replace(dest)  # atomic: a half-copied binary is never taken for a built one
    t2 = time.monotonic()
    took = f"download+extract {t1 - t0:.0f}s, configure+build {t2 - t1:.0f}s"
    (dest.parent / "build-time.txt").write_text(took + "\n")
    print(f"llama.cpp: built {dest} ({took})")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--print-path", action="store_true", help="print where the binary goes")
    args = ap.parse_args()
    if args.print_path:
        print(server_path())
        return
    path = build(args.jobs)
    version = subprocess.run(
        [str(path), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    line = (version.stdout + version.stderr).strip().splitlines()
    print(f"llama.cpp: {path}: {line[0] if line else 'no --version output'}")


if __name__ == "__main__":
    main()
