"""The MQTT edge's reconnect schedule."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from gateway.edges import mqtt
from gateway.edges.mqtt import BrokerEndpoint, BrokerUrlError, MqttEdge, redact_url

BACKOFFS = [0.1 * 2**n for n in range(12)] + [30.0, 45.0, 1e6]
RANDS = [0.0, 0.25, 0.5, 0.75, 1.0 - 2**-53]


@pytest.mark.parametrize("backoff", BACKOFFS)
@pytest.mark.parametrize("rand", RANDS)
def test_reconnect_delay_never_exceeds_the_cap(backoff: float, rand: float) -> None:
    delay = mqtt.reconnect_delay(backoff, rand)
    assert 0 < delay <= mqtt.MAX_RECONNECT_DELAY_S == 30.0


@pytest.mark.parametrize("backoff", [0.1, 1.6, 12.8, 19.9])
@pytest.mark.parametrize("rand", RANDS)
def test_reconnect_delay_below_the_cap_is_jittered_backoff(backoff: float, rand: float) -> None:
    assert mqtt.reconnect_delay(backoff, rand) == pytest.approx(backoff * (0.5 + rand))


def test_reconnect_delay_keeps_its_jitter_at_the_cap() -> None:
    # Clients that lost the broker together must not all come back in the same second.
    delays = [mqtt.reconnect_delay(30.0, r) for r in RANDS]
    assert max(delays) - min(delays) >= 15.0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_run_waits_at_most_the_cap_between_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_sleep = asyncio.sleep
    delays: list[float] = []
    edge = MqttEdge(
        name="test",
        endpoint=BrokerEndpoint("127.0.0.1", _closed_port()),
        client_id="reconnect-test",
        subscriptions=[],
        on_message=lambda _: None,
        clean_start=True,
        connect_timeout_s=1.0,
    )

    async def no_wait(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= 14:  # long enough for the backoff to reach its cap
            edge._stopping = True
        await real_sleep(0)

    monkeypatch.setattr(random, "random", lambda: 1.0 - 2**-53)  # the largest jitter
    monkeypatch.setattr(asyncio, "sleep", no_wait)
    await asyncio.wait_for(edge.run(), 20)
    assert len(delays) == 14
    assert max(delays) <= 30.0
    assert delays[-1] == pytest.approx(30.0)


SECRET = "s3cr3t"
BAD_URLS_WITH_SECRET = [
    f"mqtt://u:{SECRET}@h:99999",
    f"mqtt://u:{SECRET}@h:notaport",
    f"mqtt://u:{SECRET}@h:-1",
    f"http://u:{SECRET}@h",
    f"mqtt://u:{SECRET}@",
    f"mqtt://u:{SECRET}@[::1",
    f"u:{SECRET}@h:1883",
    f"mqtt://u:{SECRET}@x@h:99999",
    f"mqtt://u:{SECRET}%21@h:99999",
    f"mqtts://u:{SECRET}/x@h:99999",
]


@pytest.mark.parametrize("url", BAD_URLS_WITH_SECRET)
def test_broker_url_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(BrokerUrlError) as info:
        BrokerEndpoint.parse(url)
    message = str(info.value)
    assert SECRET not in message and "***" in message and "broker URL" in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://u:pw@h:1883", "mqtt://u:***@h:1883"),
        ("mqtt://u@h:1883", "mqtt://u@h:1883"),
        ("mqtt://h:1883", "mqtt://h:1883"),
        ("mqtt://u:p@w@h", "mqtt://u:***@h"),
        ("u:pw@h", "u:***@h"),
        ("mqtt://:pw@h", "mqtt://:***@h"),
        ("mqtts://u:p/w@h:8883", "mqtts://u:***@h:8883"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_valid_url_with_credentials_still_parses() -> None:
    endpoint = BrokerEndpoint.parse("mqtts://user:p%40ss@broker:8883")
    assert (endpoint.username, endpoint.password, endpoint.port) == ("user", "p@ss", 8883)
    assert "p@ss" not in endpoint.redacted()


def test_publish_property_blocks_are_those_of_their_sets_whatever_came_before() -> None:
    """The edge reuses the last block by the identity of its set (the decision
    core hands the same tuple for every message of a kind): each call still
    gets the block of exactly its own set, the empty one included."""
    from gateway.edges.mqtt_codec import publish_properties

    status = (("policy-version", "1"), ("feature", "remote_control"), ("transforms", "coarsen"))
    nav = (("policy-version", "1"), ("feature", "online_navigation"), ("transforms", ""))
    for props in [(), status, status, nav, list(status), status, (), nav, ()]:
        assert mqtt.cached_publish_properties(props) == publish_properties(props)
