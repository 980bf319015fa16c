"""TLS toward a broker: the handshake never stalls the event loop, and a
broker whose certificate does not verify is never talked to."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.policy import load_policy
from gateway.service import GatewayService
from gateway.store import SqliteConsentStore
from sim.broker import ListenerTls, MosquittoBroker
from telematics.v1 import privacy_pb2, streams_pb2

from .conftest import DEFAULT_POLICY, KEY, VIN, Car, Recorder, gateway_config, subscribe_backend

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------ helpers


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class CertificateAuthority:
    """A throw-away CA that issues broker certificates."""

    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path  # its certificate, PEM

    @classmethod
    def create(cls, directory: Path, common_name: str) -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        path = directory / "ca.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(name, key, cert, path)

    def listener(self, directory: Path, names: tuple[str, ...]) -> ListenerTls:
        """A broker certificate for `names` (IP addresses or DNS names)."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        certfile, keyfile = directory / "broker.crt", directory / "broker.key"
        certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        keyfile.write_bytes(_pem_key(key))
        return ListenerTls(cafile=self.path, certfile=certfile, keyfile=keyfile)

    def client(
        self,
        directory: Path,
        name: str,
        *,
        expired: bool = False,
        password: bytes | None = None,
    ) -> tuple[Path, Path]:
        """A client certificate and its key (PEM; the key encrypted with
        `password` if given). `expired`: valid until an hour ago."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        end = now - datetime.timedelta(hours=1) if expired else now + datetime.timedelta(days=1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=2))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        certfile, keyfile = directory / f"{name}.crt", directory / f"{name}.key"
        certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password is not None
            else serialization.NoEncryption()
        )
        keyfile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            )
        )
        return certfile, keyfile

    def client_context(self, directory: Path, name: str) -> ssl.SSLContext:
        """What a test client (car, backend recorder) uses on an mTLS listener."""
        context = ssl.create_default_context(cafile=self.path)
        context.load_cert_chain(*self.client(directory, name))
        return context


@contextlib.asynccontextmanager
async def running_gateway(
    config: GatewayConfig, *, wait_ready: bool
) -> AsyncIterator[GatewayService]:
    service = GatewayService(
        config, load_policy(DEFAULT_POLICY), KEY, SqliteConsentStore.in_state_dir(config.state_dir)
    )
    await service.start()
    try:
        if wait_ready:
            await asyncio.wait_for(service.ready.wait(), 10)
        yield service
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def silent_listener() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never sends a byte:
    a TLS client waits forever for the ServerHello."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(OSError):
            while await reader.read(4096):
                pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


class ThreadedCar:
    """A car whose MQTT client runs on its own thread, so that what it
    measures does not depend on the gateway's event loop being free."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self._answers: dict[int, threading.Event] = {}
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"tbox-{VIN}"
        )
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", broker.port)
        self._client.subscribe(f"vehicle/{VIN}/avn/privacy/applied", qos=1)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        applied = privacy_pb2.PrivacyApplied.FromString(msg.payload)
        event = self._answers.get(applied.revision)
        if event is not None:
            event.set()

    def settings_round_trip(self, revision: int, timeout: float = 15.0) -> float:
        """Send settings; seconds until the gateway's PrivacyApplied arrived."""
        msg = privacy_pb2.PrivacySettings(revision=revision, location=3)
        msg.header.vin = VIN
        msg.features["remote_control"] = True
        answered = self._answers[revision] = threading.Event()
        started = time.monotonic()
        self._client.publish(f"vehicle/{VIN}/avn/privacy", msg.SerializeToString(), qos=1)
        if not answered.wait(timeout):
            raise TimeoutError(f"no PrivacyApplied for revision {revision}")
        return time.monotonic() - started

    def probe(self, duration: float, every: float = 0.25) -> list[float]:
        """Settings round trips, one after the other, for `duration` seconds."""
        times: list[float] = []
        end = time.monotonic() + duration
        while time.monotonic() < end:
            times.append(self.settings_round_trip(len(times) + 1))
            time.sleep(every)
        return times

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


async def max_loop_lag(duration: float, period: float = 0.02) -> float:
    """The longest the event loop was late waking a sleeping task."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    end = loop.time() + duration
    while loop.time() < end:
        before = loop.time()
        await asyncio.sleep(period)
        worst = max(worst, loop.time() - before - period)
    return worst


async def test_silent_tls_backend_does_not_stall_the_loop_or_the_vehicle_side(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """A backend endpoint that accepts TCP but never answers the TLS handshake
    must not freeze the event loop: the vehicle side keeps answering."""
    car = ThreadedCar(broker)
    try:
        async with silent_listener() as port:
            config = gateway_config(broker.url, f"mqtts://127.0.0.1:{port}", tmp_path / "state")
            async with running_gateway(config, wait_ready=False) as service:
                lag = asyncio.create_task(max_loop_lag(6.0))
                await asyncio.wait_for(service.vehicle_edge.ready.wait(), 10)
                # Spread over the backend's connect attempts.
                answers = await asyncio.to_thread(car.probe, 5.0)
                worst_lag = await lag
                assert not service.backend_edge.ready.is_set()
    finally:
        car.close()
    print(f"max loop lag {worst_lag:.3f} s, PrivacyApplied after {max(answers):.3f} s")
    assert worst_lag < 0.5, f"event loop stalled for {worst_lag:.2f} s"
    assert max(answers) < 1.0, f"PrivacyApplied took {max(answers):.2f} s"


def _status(car: Car) -> streams_pb2.VehicleStatus:
    msg = streams_pb2.VehicleStatus(fuel_level_pct=50.0)
    msg.position.latitude, msg.position.longitude = 48.137154, 11.576124
    car.header(msg)
    return msg


async def test_gateway_forwards_end_to_end_over_tls(tmp_path: Path) -> None:
    """Both sides over mqtts:// (one by IP address, one by name), trusting a
    private CA: settings are applied and answered, enabled streams arrive,
    including messages larger than a TLS record."""
    ca = CertificateAuthority.create(tmp_path / "pki", "test broker CA")
    tls = ca.listener(tmp_path / "pki", ("127.0.0.1", "localhost"))
    with MosquittoBroker(tls=tls) as broker:
        assert broker.url.startswith("mqtts://")
        config = gateway_config(
            f"mqtts://localhost:{broker.port}",
            f"mqtts://127.0.0.1:{broker.port}",
            tmp_path / "state",
        )
        config.vehicle_broker.tls_ca_file = ca.path
        config.backend_broker.tls_ca_file = ca.path
        trust = ssl.create_default_context(cafile=ca.path)
        async with (
            aiomqtt.Client(
                "127.0.0.1",
                broker.port,
                identifier="test-backend",
                protocol=aiomqtt.ProtocolVersion.V5,
                tls_context=trust,
            ) as backend_client,
            aiomqtt.Client(
                "127.0.0.1", broker.port, identifier=f"tbox-{VIN}", tls_context=trust
            ) as car_client,
            running_gateway(config, wait_ready=True),
        ):
            await subscribe_backend(backend_client)
            recorder = Recorder(backend_client)
            car = Car(car_client, recorder)
            await car.subscribe()
            tasks = [asyncio.create_task(recorder.run()), asyncio.create_task(car.run())]
            try:
                await car.settings(1, features={"remote_control": True, "third_party.music": True})
                sent = [_status(car) for _ in range(300)]
                for msg in sent:
                    await car.send("tbox/status", msg)
                big = car.header(streams_pb2.AppTraffic(app_id="music", payload=b"m" * 60_000))
                await car.send("avn/app/music", big)
                await car.barrier()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    got = [
        streams_pb2.VehicleStatus.FromString(m.payload).header.seq  # type: ignore[arg-type]
        for m in recorder.on("/tbox/status")
    ]
    assert got == [m.header.seq for m in sent]
    (app,) = recorder.on("/avn/app/music")
    assert streams_pb2.AppTraffic.FromString(app.payload).payload == big.payload  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        # mosquitto sends its CA along: the chain ends in a root we do not trust
        ("unknown CA", "certificate verify failed: self-signed certificate in certificate chain"),
        ("wrong name", "certificate verify failed: IP address mismatch"),
    ],
)
async def test_untrusted_backend_broker_is_never_talked_to(
    broker: MosquittoBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
    reason: str,
) -> None:
    """A backend whose certificate does not verify (CA not trusted, or not
    issued for the host): the handshake fails with a clear log line and
    nothing is sent to it, in clear or otherwise."""
    ca = CertificateAuthority.create(tmp_path / "ca", "backend CA")
    names = ("127.0.0.1", "localhost") if case == "unknown CA" else ("broker.example",)
    tls = ca.listener(tmp_path / "ca", names)
    trusted = (
        ca if case == "wrong name" else CertificateAuthority.create(tmp_path / "other", "other")
    )
    with MosquittoBroker(tls=tls) as backend:
        config = gateway_config(broker.url, backend.url, tmp_path / "state")
        config.backend_broker.tls_ca_file = trusted.path
        config.pipeline.drain_timeout_s = 0.5  # what waits for the backend is not our subject
        caplog.set_level(logging.WARNING, logger="gateway.mqtt")
        watcher_trust = ssl.create_default_context(cafile=ca.path)
        watcher_trust.check_hostname = False  # only the gateway's view of the name is tested
        async with (
            aiomqtt.Client(
                "127.0.0.1",
                backend.port,
                identifier="test-backend",
                protocol=aiomqtt.ProtocolVersion.V5,
                tls_context=watcher_trust,
            ) as backend_client,
            aiomqtt.Client("127.0.0.1", broker.port, identifier=f"tbox-{VIN}") as car_client,
            running_gateway(config, wait_ready=False) as service,
        ):
            await subscribe_backend(backend_client)
            recorder = Recorder(backend_client)
            car = Car(car_client, recorder)
            await car.subscribe()
            tasks = [asyncio.create_task(recorder.run()), asyncio.create_task(car.run())]
            try:
                await asyncio.wait_for(service.vehicle_edge.ready.wait(), 10)
                await car.settings(1, features={"remote_control": True})
                ecall = car.header(streams_pb2.ECall())
                await car.send("tbox/ecall", ecall)  # always forwarded, were there a connection
                await car.send("tbox/status", _status(car))
                await asyncio.sleep(1.5)
                assert not service.backend_edge.ready.is_set()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    assert recorder.messages == []
    expected = f"backend broker mqtts://127.0.0.1:{backend.port} TLS handshake failed: {reason}"
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.mqtt"]
    assert any(line.startswith(expected) for line in lines), lines


def test_ca_file_in_config(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "pki", "config CA")
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        "[backend_broker]\n"
        'url = "mqtts://tsp.example:8883"\n'
        'client_id = "gw"\n'
        'topic_prefix = "tsp"\n'
        'tls_ca_file = "pki/ca.crt"\n'
    )
    config = load_config(toml)
    assert config.backend_broker.tls_ca_file == ca.path.resolve()
    context = config.backend_broker.tls_context()
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert config.vehicle_broker.tls_context() is None  # mqtt://

    toml.write_text(toml.read_text().replace("mqtts://", "mqtt://"))
    with pytest.raises(ConfigError, match="tls_ca_file is set but the url is not mqtts://"):
        load_config(toml)

    missing = config.backend_broker.model_copy(update={"tls_ca_file": tmp_path / "nope.crt"})
    with pytest.raises(ConfigError, match=r"nope\.crt: cannot load"):
        missing.tls_context()


def _run_gateway(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(config), *extra],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_run_refuses_unusable_ca_file_and_plaintext_override(tmp_path: Path) -> None:
    toml = tmp_path / "gateway.toml"
    toml.write_text(
        f'policy = "{DEFAULT_POLICY}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[vehicle_broker]\n"
        'url = "mqtt://127.0.0.1:1"\n'
        'client_id = "test-vehicle"\n'
        'topic_prefix = "vehicle"\n'
        "[backend_broker]\n"
        'url = "mqtts://127.0.0.1:1"\n'
        'client_id = "test-backend"\n'
        'topic_prefix = "tsp"\n'
        'tls_ca_file = "missing-ca.pem"\n'
    )
    result = _run_gateway(toml, "--control-listen", "")
    assert result.returncode == 2, result.stderr
    assert f"tls_ca_file {tmp_path / 'missing-ca.pem'}: cannot load" in result.stderr

    result = _run_gateway(toml, "--backend-broker", "mqtt://127.0.0.1:1")
    assert result.returncode == 2, result.stderr
    assert "backend_broker" in result.stderr
    assert "tls_ca_file is set but the url is not mqtts://" in result.stderr
