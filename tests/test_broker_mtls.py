"""Mutual TLS toward a broker that requires client certificates (real
mosquitto, `require_certificate true`): a valid certificate connects and
forwards; a refused one is named in the log and nothing is forwarded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.config import BrokerConfig, ConfigError
from sim.broker import ListenerTls, MosquittoBroker, free_port
from telematics.v1 import streams_pb2

from .conftest import DEFAULT_POLICY, VIN, Car, Recorder, gateway_config, subscribe_backend
from .test_cli import gateway
from .test_tls import CertificateAuthority, running_gateway

pytestmark = pytest.mark.integration

PASSWORD = b"correct horse battery staple"


def tls_broker_config(base: BrokerConfig, **fields: Any) -> BrokerConfig:
    """`base` with TLS fields set, validated like a loaded config."""
    return BrokerConfig.model_validate({**base.model_dump(), **fields})


@dataclass
class Pki:
    ca: CertificateAuthority
    directory: Path

    def listener(self) -> ListenerTls:
        tls = self.ca.listener(self.directory / "broker", ("127.0.0.1", "localhost"))
        return ListenerTls(tls.cafile, tls.certfile, tls.keyfile, require_certificate=True)

    def client_context(self, name: str) -> ssl.SSLContext:
        return self.ca.client_context(self.directory / "clients", name)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(CertificateAuthority.create(tmp_path / "pki", "mtls CA"), tmp_path / "pki")


@contextlib.asynccontextmanager
async def recording(
    backend: MosquittoBroker, context: ssl.SSLContext | None
) -> AsyncIterator[Recorder]:
    """A backend-side client recording tsp/# (with its own client certificate)."""
    async with aiomqtt.Client(
        "127.0.0.1",
        backend.port,
        identifier="test-backend",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
    ) as client:
        await subscribe_backend(client)
        recorder = Recorder(client)
        task = asyncio.create_task(recorder.run())
        try:
            yield recorder
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def car_on(vehicle: MosquittoBroker, context: ssl.SSLContext | None) -> AsyncIterator[Car]:
    async with aiomqtt.Client(
        "127.0.0.1", vehicle.port, identifier=f"tbox-{VIN}", tls_context=context
    ) as client:
        car = Car(client, Recorder(client))
        await car.subscribe()
        task = asyncio.create_task(car.run())
        try:
            yield car
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def status(car: Car) -> streams_pb2.VehicleStatus:
    msg = streams_pb2.VehicleStatus(fuel_level_pct=50.0)
    msg.position.latitude, msg.position.longitude = 48.137154, 11.576124
    car.header(msg)
    return msg


async def test_mutual_tls_forwards_end_to_end(pki: Pki, tmp_path: Path) -> None:
    """Both sides on a broker that requires client certificates; the gateway's
    key is encrypted, its password read from a file."""
    cert, key = pki.ca.client(pki.directory / "gw", "gateway", password=PASSWORD)
    password_file = tmp_path / "key.pass"
    password_file.write_bytes(PASSWORD + b"\n")  # a trailing newline is not part of it
    with MosquittoBroker(tls=pki.listener()) as broker:
        config = gateway_config(
            f"mqtts://localhost:{broker.port}", broker.url, tmp_path / "state"
        )
        tls = {
            "tls_ca_file": pki.ca.path,
            "tls_cert_file": cert,
            "tls_key_file": key,
            "tls_key_password_file": password_file,
        }
        config.vehicle_broker = tls_broker_config(config.vehicle_broker, **tls)
        config.backend_broker = tls_broker_config(config.backend_broker, **tls)
        async with (
            recording(broker, pki.client_context("backend")) as recorder,
            car_on(broker, pki.client_context("car")) as car,
            running_gateway(config, wait_ready=True),
        ):
            await car.settings(1, features={"remote_control": True})
            sent = [status(car) for _ in range(50)]
            for msg in sent:
                await car.send("tbox/status", msg)
            await car.barrier()
    got = [
        streams_pb2.VehicleStatus.FromString(m.payload).header.seq  # type: ignore[arg-type]
        for m in recorder.on("/tbox/status")
    ]
    assert got == [m.header.seq for m in sent]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong CA", "tlsv1 alert unknown ca"),
        ("expired", "sslv3 alert certificate expired"),
        ("missing", "tlsv13 alert certificate required"),
    ],
)
async def test_refused_client_certificate_is_named_and_nothing_is_forwarded(
    pki: Pki,
    broker: MosquittoBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
    reason: str,
) -> None:
    """A TLS 1.3 broker refuses a client certificate after the client's side
    of the handshake is complete: its alert arrives while CONNECT is on its
    way. The log still says which broker and why (never paho's "Unspecified
    error"), the backend is never ready and nothing reaches it."""
    fields: dict[str, Any] = {"tls_ca_file": pki.ca.path}
    if case == "wrong CA":
        other = CertificateAuthority.create(tmp_path / "other", "other CA")
        fields["tls_cert_file"], fields["tls_key_file"] = other.client(tmp_path / "other", "gw")
    elif case == "expired":
        fields["tls_cert_file"], fields["tls_key_file"] = pki.ca.client(
            tmp_path / "gw", "gw", expired=True
        )
    with MosquittoBroker(tls=pki.listener()) as backend:
        config = gateway_config(broker.url, backend.url, tmp_path / "state")
        config.backend_broker = tls_broker_config(config.backend_broker, **fields)
        config.pipeline.drain_timeout_s = 0.5
        caplog.set_level(logging.WARNING, logger="gateway.mqtt")
        async with (
            recording(backend, pki.client_context("backend")) as recorder,
            car_on(broker, None) as car,
            running_gateway(config, wait_ready=False) as service,
        ):
            await asyncio.wait_for(service.vehicle_edge.ready.wait(), 10)
            await car.settings(1, features={"remote_control": True})
            await car.send("tbox/ecall", car.header(streams_pb2.ECall()))
            await car.send("tbox/status", status(car))
            await asyncio.sleep(1.5)
            assert not service.backend_edge.ready.is_set()
    assert recorder.messages == []
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.mqtt"]
    expected = f"backend broker mqtts://127.0.0.1:{backend.port} TLS handshake failed: {reason}"
    assert any(line.startswith(expected) for line in lines), lines
    assert not any("Unspecified error" in line for line in lines), lines
    if case == "missing":
        assert any("no client certificate is configured" in line for line in lines), lines


async def test_server_name_override(pki: Pki, broker: MosquittoBroker, tmp_path: Path) -> None:
    """`tls_server_name` is the name checked in the broker's certificate (and
    sent as SNI) when the URL's host is not in it."""
    tls = pki.ca.listener(pki.directory / "named", ("broker.example",))
    cert, key = pki.ca.client(pki.directory / "gw", "gw")
    common = {"tls_ca_file": pki.ca.path, "tls_cert_file": cert, "tls_key_file": key}
    named = ListenerTls(tls.cafile, tls.certfile, tls.keyfile, require_certificate=True)
    with MosquittoBroker(tls=named) as backend:
        config = gateway_config(broker.url, backend.url, tmp_path / "state")
        config.backend_broker = tls_broker_config(
            config.backend_broker, tls_server_name="broker.example", **common
        )
        async with running_gateway(config, wait_ready=True):
            pass


@contextlib.contextmanager
def tls12_listener(tls: ListenerTls) -> Iterator[int]:
    """A TLS 1.2-only endpoint that requires a client certificate (mosquitto
    cannot cap the version): OpenSSL's own test server, as brokers use
    OpenSSL. It never gets as far as MQTT."""
    port = free_port()
    server = subprocess.Popen(
        [
            "openssl", "s_server", "-quiet", "-accept", f"127.0.0.1:{port}", "-tls1_2",
            "-cert", str(tls.certfile), "-key", str(tls.keyfile), "-CAfile", str(tls.cafile),
            "-Verify", "1", "-verify_return_error",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait(5)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("minimum 1.3", "protocol version (no TLS version both sides accept"),
        ("no client certificate", "handshake failure (no client certificate is configured"),
    ],
)
async def test_tls_1_2_refusals_during_the_handshake(
    pki: Pki,
    broker: MosquittoBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
    reason: str,
) -> None:
    """Against a TLS 1.2-only broker, `tls_min_version = "1.3"` refuses to
    connect, and a missing client certificate fails the handshake itself:
    both logged with the broker and the reason."""
    tls = pki.ca.listener(pki.directory / "tls12", ("127.0.0.1",))
    fields: dict[str, Any] = {"tls_ca_file": pki.ca.path}
    if case == "minimum 1.3":
        fields["tls_cert_file"], fields["tls_key_file"] = pki.ca.client(tmp_path / "gw", "gw")
        fields["tls_min_version"] = "1.3"
    with tls12_listener(tls) as port:
        config = gateway_config(broker.url, f"mqtts://127.0.0.1:{port}", tmp_path / "state")
        config.backend_broker = tls_broker_config(config.backend_broker, **fields)
        config.pipeline.drain_timeout_s = 0.5
        caplog.set_level(logging.WARNING, logger="gateway.mqtt")
        async with running_gateway(config, wait_ready=False) as service:
            await asyncio.sleep(1.0)
            assert not service.backend_edge.ready.is_set()
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.mqtt"]
    expected = f"backend broker mqtts://127.0.0.1:{port} TLS handshake failed: "
    assert any(line.startswith(expected) and reason in line for line in lines), lines


# ------------------------------------------------------------- configuration


def test_tls_client_settings_are_validated(tmp_path: Path) -> None:
    base = BrokerConfig(url="mqtts://tsp.example", client_id="gw", topic_prefix="tsp")
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    problems = {
        "tls_cert_file and tls_key_file must be set together (tls_key_file is missing)": {
            "tls_cert_file": cert
        },
        "tls_cert_file and tls_key_file must be set together (tls_cert_file is missing)": {
            "tls_key_file": key
        },
        "tls_key_password_file is set but tls_key_file is not": {
            "tls_key_password_file": tmp_path / "p"
        },
        "Input should be '1.2' or '1.3'": {"tls_min_version": "1.1"},
    }
    for message, fields in problems.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            tls_broker_config(base, **fields)
    plain = BrokerConfig(url="mqtt://tsp.example", client_id="gw", topic_prefix="tsp")
    for field in ("tls_cert_file", "tls_server_name"):
        value: Any = "tsp.example" if field == "tls_server_name" else cert
        extra = {"tls_key_file": key} if field == "tls_cert_file" else {}
        with pytest.raises(ValueError, match=f"{field} is set but the url is not mqtts://"):
            tls_broker_config(plain, **{field: value, **extra})


def test_key_password_problems_are_config_errors(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.ca.client(tmp_path, "gw", password=PASSWORD)
    base = BrokerConfig(url="mqtts://tsp.example", client_id="gw", topic_prefix="tsp")
    config = tls_broker_config(
        base, tls_cert_file=cert, tls_key_file=key, tls_key_password_file=tmp_path / "none"
    )
    with pytest.raises(ConfigError, match=r"tls_key_password_file .*none: cannot read"):
        config.tls_context()
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not it\n")
    config = tls_broker_config(config, tls_key_password_file=wrong)
    with pytest.raises(ConfigError, match=r"tls_key_file .*gw\.key: .*password"):
        config.tls_context()
    config = tls_broker_config(config, tls_key_password_file=None)
    with pytest.raises(ConfigError, match=r"tls_key_file .*gw\.key: .*encrypted.*password"):
        config.tls_context()
    right = tmp_path / "right.pass"
    right.write_bytes(PASSWORD)
    context = tls_broker_config(config, tls_key_password_file=right).tls_context()
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_run_refuses_unreadable_key_password_file(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.ca.client(tmp_path, "gw", password=PASSWORD)
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        f'policy = "{DEFAULT_POLICY}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[control]\n"
        'listen = ""\n'
        "[vehicle_broker]\n"
        'url = "mqtt://127.0.0.1:1"\n'
        'client_id = "test-vehicle"\n'
        'topic_prefix = "vehicle"\n'
        "[backend_broker]\n"
        'url = "mqtts://127.0.0.1:1"\n'
        'client_id = "test-backend"\n'
        'topic_prefix = "tsp"\n'
        f'tls_cert_file = "{cert}"\n'
        f'tls_key_file = "{key}"\n'
        'tls_key_password_file = "missing.pass"\n'
    )
    result = gateway("run", "--config", toml)
    assert result.returncode == 2, result.stderr
    assert "backend_broker" in result.stderr
    assert f"tls_key_password_file {tmp_path / 'missing.pass'}: cannot read" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was touched
