"""Run the shipped ``deploy/nginx/orchd.conf`` in a real nginx, unprivileged-port edition.

The shipped file is used as it is but for the lines an operator edits (ports, upstream
address, certificate paths); each substitution must match the file, so a change to the
shipped file that would leave the test exercising something else fails here first."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from pathlib import Path
from typing import BinaryIO

from tests.support.ports import accepts, free_port
from tests.support.wait import wait_for

NGINX = "/usr/sbin/nginx"  # Debian's package nginx
OPENSSL = "/usr/bin/openssl"
SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "orchd.conf"
READY_TIMEOUT_S = 15.0


def self_signed(dirpath: Path, host: str = "localhost") -> tuple[Path, Path]:
    """A throwaway P-256 certificate for ``host`` and 127.0.0.1, valid for a day (openssl)."""
    cert, key = dirpath / "cert.pem", dirpath / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", f"/CN={host}", "-addext", f"subjectAltName=DNS:{host},IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def render(site: str, *, upstream_port: int, https_port: int, http_port: int,
           cert: Path, key: Path) -> str:  # fmt: skip
    """The shipped site with its operator-edited lines pointed at this test's ports/files."""
    subs = [
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        ("listen [::]:443 ssl http2;", ""),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("/etc/orchd/tls/fullchain.pem", str(cert)),
        ("/etc/orchd/tls/privkey.pem", str(key)),
    ]
    for old, new in subs:
        if site.count(old) != 1:
            raise ValueError(f"{SHIPPED.name}: expected {old!r} exactly once")
        site = site.replace(old, new)
    return site


class Nginx:
    """nginx in the foreground (``daemon off``) with everything under ``workdir``."""

    def __init__(self, workdir: Path, upstream_port: int, site: str | None = None) -> None:
        self.workdir = workdir
        self.https_port = free_port()
        self.http_port = free_port()
        cert, key = self_signed(workdir)
        text = SHIPPED.read_text() if site is None else site
        (workdir / "orchd.conf").write_text(
            render(
                text,
                upstream_port=upstream_port,
                https_port=self.https_port,
                http_port=self.http_port,
                cert=cert,
                key=key,
            )  # fmt: skip
        )
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
            (workdir / d).mkdir(exist_ok=True)
        # As root, nginx's workers would switch to "nobody", who cannot read this directory.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        (workdir / "nginx.conf").write_text(
            f"""{user}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/logs/access.log;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    include {workdir}/orchd.conf;
}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    def command(self, *extra: str) -> list[str]:
        conf = str(self.workdir / "nginx.conf")
        return [NGINX, "-p", str(self.workdir), "-c", conf, "-e", "stderr", *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t``: the configuration parses and its certificate loads."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self) -> Nginx:
        self._log = open(self.workdir / "logs" / "stderr.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command("-g", "daemon off;"), stdout=subprocess.DEVNULL, stderr=self._log
        )
        try:
            wait_for(
                lambda: (
                    self.proc is not None
                    and (self.proc.poll() is not None or accepts("127.0.0.1", self.https_port))
                ),
                READY_TIMEOUT_S,
                "nginx to listen",
            )
        except BaseException:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.stderr()}")
        return self

    def stderr(self) -> str:
        return (self.workdir / "logs" / "stderr.log").read_text(errors="replace")

    def stop(self) -> None:
        """SIGQUIT: nginx's graceful shutdown; SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
