"""TLS test fixtures' helpers: certificates made with the ``openssl`` command line, and a Redis
server that speaks only TLS and wants a client certificate.

``make_certificates`` writes a CA, a server certificate for ``127.0.0.1`` and ``localhost``, a
client certificate signed by the same CA, an expired client certificate, and a second CA that
signed nothing of the server's. ``TlsServer`` runs ``redis-server --port 0 --tls-port P`` on
loopback, listening on ``127.0.0.1`` (named in its certificate) and ``127.0.0.2`` (not named:
a client that checks the name refuses it).

Debian's ``/usr/bin/redis-server`` is built with TLS; when it is missing, ``tls_server_binary``
installs it with apt-get, and failing that says what to install. Nothing here skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from conveyor.server import free_port

__all__ = ["TlsFiles", "TlsServer", "make_certificates", "tls_server_binary"]

REDIS_SERVER = Path("/usr/bin/redis-server")
#: the host names the server certificate is for; 127.0.0.2 reaches the same server unnamed
SERVER_NAMES = ("127.0.0.1", "localhost")
UNNAMED_HOST = "127.0.0.2"
START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files ``make_certificates`` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    expired_cert: Path
    expired_key: Path
    #: a CA that signed nothing the server has
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError(
            "the TLS tests need the openssl command line to make certificates: "
            "apt-get install -y openssl"
        )
    done = subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *_EC_KEY, "-keyout", key.name, "-out", cert.name,
        "-days", "2", "-subj", f"/CN=conveyor test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _signed(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str, *, days: int = 2
) -> tuple[Path, Path]:
    """A certificate and key for ``name``, signed by ``ca``; ``days`` -1 makes it expired."""
    cert, key, csr = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    ext = directory / f"{name}.ext"
    ext.write_text(extensions + "\n")
    _openssl(
        "req", *_EC_KEY, "-keyout", key.name, "-out", csr.name, "-subj", f"/CN=conveyor {name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name,
        "-CAcreateserial", "-out", cert.name, "-days", str(days), "-extfile", ext.name,
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_certificates(directory: Path) -> TlsFiles:
    """Write the certificates of the TLS tests into ``directory``."""
    ca = _ca(directory, "ca")
    other_ca, _ = _ca(directory, "other-ca")
    names = ",".join(f"IP:{n}" if n[0].isdigit() else f"DNS:{n}" for n in SERVER_NAMES)
    server = _signed(
        directory, "server", ca, f"subjectAltName={names}\nextendedKeyUsage=serverAuth"
    )
    client = _signed(directory, "client", ca, "extendedKeyUsage=clientAuth")
    # notAfter a day before notBefore: expired from the start
    expired = _signed(directory, "expired", ca, "extendedKeyUsage=clientAuth", days=-1)
    return TlsFiles(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        expired_cert=expired[0],
        expired_key=expired[1],
        other_ca=other_ca,
    )


def _install_redis_server() -> str:
    """Install Debian's redis-server; the output of apt-get when that fails, else ''."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for args in (["update"], ["install", "-y", "redis-server"]):
            done = subprocess.run(
                ["apt-get", *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                return f"apt-get {' '.join(args)}: {done.stderr.strip()[-500:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get: {exc}"
    return ""


def tls_server_binary() -> Path:
    """``/usr/bin/redis-server``, installed with apt-get if it is missing. RuntimeError saying
    what to install when that cannot be done."""
    if os.access(REDIS_SERVER, os.X_OK):
        return REDIS_SERVER
    problem = _install_redis_server()
    if os.access(REDIS_SERVER, os.X_OK):
        return REDIS_SERVER
    raise RuntimeError(
        f"the TLS tests need a Redis server built with TLS at {REDIS_SERVER}: install it with "
        f"`sudo apt-get install -y redis-server` (Debian/Ubuntu). {problem}"
    )


class TlsServer:
    """``redis-server`` on a free loopback port that speaks TLS only and wants a client
    certificate signed by the test CA.

    >>> with TlsServer(files) as server:   # doctest: +SKIP
    ...     conveyor.connect(server.url, tls_ca=files.ca, ...)
    """

    def __init__(self, files: TlsFiles, binary: Path | None = None) -> None:
        self.files = files
        self.binary = binary or tls_server_binary()
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="conveyor-tls-server-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._dir / "server.log"

    def url_for(self, host: str) -> str:
        return f"rediss://{host}:{self.port}"

    def start(self) -> TlsServer:
        files = self.files
        args = [
            str(self.binary),
            "--port", "0",
            "--tls-port", str(self.port),
            "--bind", "127.0.0.1", UNNAMED_HOST,
            "--tls-cert-file", str(files.server_cert),
            "--tls-key-file", str(files.server_key),
            "--tls-ca-cert-file", str(files.ca),
            "--tls-auth-clients", "yes",
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self._proc.poll() is None:
            if self._answers():
                return self
            time.sleep(0.02)
        tail = self._log_tail()
        self.close()
        raise RuntimeError(f"{self.binary} did not start with TLS on port {self.port}: {tail}")

    def _answers(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.files.ca))
        context.load_cert_chain(str(self.files.client_cert), str(self.files.client_key))
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(b"PING\r\n")
                return tls.recv(64).startswith(b"+PONG")
        except OSError:  # ssl.SSLError too
            return False

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) or "no log"

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> TlsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
