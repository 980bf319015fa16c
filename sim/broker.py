"""Start a private Mosquitto broker on a free port with its own config.

Used by the demo, the integration tests and the benchmarks so none of them
depends on a broker already running on the machine.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO


def find_mosquitto() -> str:
    return _find("mosquitto")


def _find(program: str) -> str:
    for directory in ("", "/usr/sbin/", "/usr/local/sbin/", "/usr/bin/"):
        found = shutil.which(directory + program)
        if found:
            return found
    raise FileNotFoundError(
        f"{program} not found: install mosquitto (Debian: apt-get install mosquitto) "
        "or run the README's commands, which install it"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ListenerTls:
    """PEM files of a TLS listener: the CA that clients are told about (and,
    with `require_certificate`, the one client certificates must chain to),
    the broker's certificate (chain) and its private key."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False

    def install(self, directory: Path) -> list[str]:
        """Copy the files where mosquitto can read them; its config lines.

        mosquitto started as root reads them only after dropping to its own
        user, which cannot enter our private temp directories."""
        directory.mkdir(exist_ok=True)
        directory.chmod(0o755)
        ca, cert, key = directory / "ca.crt", directory / "broker.crt", directory / "broker.key"
        for source, target, mode in (
            (self.cafile, ca, 0o644),
            (self.certfile, cert, 0o644),
            (self.keyfile, key, 0o600),
        ):
            shutil.copyfile(source, target)
            target.chmod(mode)
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):  # no such user: mosquitto keeps root
                user = pwd.getpwnam("mosquitto")
                os.chown(key, user.pw_uid, user.pw_gid)
        lines = [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        if self.require_certificate:
            lines.append("require_certificate true")
        return lines


class MosquittoBroker:
    """A mosquitto process listening on 127.0.0.1:<free port>.

    Queues are sized for outages: a persistent session keeps up to
    `max_queued` QoS 1 messages while its client is away (mosquitto's
    default of 1000 silently drops beyond that). With `tls` the listener
    speaks only TLS (mqtts://).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        max_queued: int = 1_000_000,
        max_inflight: int = 1000,
        workdir: Path | None = None,
        persistence: bool = False,
        acl: str | None = None,
        max_packet_size: int | None = None,
        tls: ListenerTls | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.max_queued = max_queued
        self.max_inflight = max_inflight
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self.persistence = persistence
        self.acl = acl  # mosquitto acl_file text; reloaded by reload() (SIGHUP)
        self.max_packet_size = max_packet_size
        self.tls = tls
        self.users = users  # user -> password; set: anonymous clients are refused
        self.process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def config_text(self) -> str:
        return "\n".join(
            [
                f"listener {self.port} 127.0.0.1",
                *self._tls_lines(),
                *self._auth_lines(),
                *self._persistence_lines(),
                f"max_queued_messages {self.max_queued}",
                "max_queued_bytes 0",
                f"max_inflight_messages {self.max_inflight}",
                *self._limit_lines(),
                "max_keepalive 65535",
                "set_tcp_nodelay true",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "connection_messages true",
                "",
            ]
        )

    def _auth_lines(self) -> list[str]:
        if self.users is None:
            return ["allow_anonymous true"]
        self.workdir.chmod(0o755)
        path = self.workdir / "passwords"
        path.write_text("")
        for user, password in self.users.items():
            subprocess.run(
                [_find("mosquitto_passwd"), "-b", str(path), user, password],
                check=True,
                capture_output=True,
            )
        path.chmod(0o644)  # mosquitto started as root reads it as its own user
        return ["allow_anonymous false", f"password_file {path}"]

    def _limit_lines(self) -> list[str]:
        lines = []
        if self.max_packet_size is not None:
            lines.append(f"max_packet_size {self.max_packet_size}")
        if self.acl is not None:
            self.workdir.chmod(0o755)
            acl_path = self.workdir / "acl"
            acl_path.write_text(self.acl)
            acl_path.chmod(0o644)
            lines.append(f"acl_file {acl_path}")
        return lines

    def reload(self, acl: str | None = None) -> None:
        """Change the ACL and make the running broker re-read it (SIGHUP)."""
        if acl is not None:
            self.acl = acl
            (self.workdir / "acl").write_text(acl)
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def _tls_lines(self) -> list[str]:
        if self.tls is None:
            return []
        self.workdir.chmod(0o755)
        return self.tls.install(self.workdir / "tls")

    def _persistence_lines(self) -> list[str]:
        if not self.persistence:
            return ["persistence false"]
        self.workdir.chmod(0o755)
        store = self.workdir / "persist"
        store.mkdir(exist_ok=True)
        store.chmod(0o777)  # mosquitto started as root writes as its own user
        return ["persistence true", f"persistence_location {store}/", "autosave_interval 1"]

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        # Logs go to a file we own: mosquitto started as root drops to its own
        # user and could not write into our private temp directory.
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on port {self.port} within {timeout}s")

    def stop_keep_state(self) -> None:
        """Stop the process but keep the work directory, to start() it again
        on the same port (with persistence, sessions survive)."""
        own, self._own_workdir = self._own_workdir, False
        try:
            self.stop()
        finally:
            self._own_workdir = own

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self.process = None
        if self._own_workdir and not os.environ.get("KEEP_BROKER_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
