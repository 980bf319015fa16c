"""A minimal MQTT v5 client on blocking sockets, for the load generator and receiver.

Why not paho/aiomqtt here: on a 2-core machine the measuring side must cost as
little CPU as possible, or it steals the core the gateway needs. Packets are
pre-encoded, written in large batches and parsed with a tight loop; the
protocol is still the real one (QoS 1, PUBACKs, Receive Maximum honoured).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Sequence

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBSCRIBE = 0x82
SUBACK = 0x90
DISCONNECT = b"\xe0\x00"

# MQTT v5 property id -> encoded size class, for walking CONNACK properties.
_PROP_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_PROP_U16 = {0x13, 0x21, 0x22, 0x23}
_PROP_U32 = {0x02, 0x11, 0x18, 0x27}
_PROP_STR = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F, 0x09, 0x16}
_PROP_PAIR = 0x26
_PROP_VARINT = 0x0B


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(buf: bytes | bytearray | memoryview, i: int) -> tuple[int, int]:
    """Base-128 varint (MQTT remaining length and protobuf share it)."""
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """QoS 1 PUBLISH, no properties."""
    body = _utf8(topic) + packet_id.to_bytes(2, "big") + b"\x00" + payload
    return bytes([PUBLISH | 0x02]) + remaining_length(len(body)) + body


def header_seq(payload: bytes) -> int:
    """header.seq of a telematics.v1 message without decoding it (-1 if absent).

    Every stream message has `Header header = 1` and serialises it first. A
    JSON payload (the peer benchmark's flows) gives its `"seq"` member.
    """
    if not payload:
        return -1
    if payload[0] == 0x7B:  # "{"
        return _json_seq(payload)
    if payload[0] != 0x0A:
        return -1
    length, i = read_varint(payload, 1)
    end = i + length
    while i < end:
        tag = payload[i]
        i += 1
        if tag == 0x10:
            return read_varint(payload, i)[0]
        if tag & 0x07 == 2:
            length, i = read_varint(payload, i)
            i += length
        else:
            i = read_varint(payload, i)[1]
    return -1


def _json_seq(payload: bytes) -> int:
    """`"seq": 12` or `"seq": "12"` (proto3 JSON writes 64-bit integers as strings)."""
    at = payload.find(b'"seq":')
    if at < 0:
        return -1
    i = at + 6
    while payload[i : i + 1] in (b" ", b'"'):
        i += 1
    j = i
    while payload[j : j + 1].isdigit():
        j += 1
    return int(payload[i:j]) if j > i else -1


class Connection:
    """One MQTT v5 connection (clean start, no session)."""

    def __init__(
        self, host: str, port: int, client_id: str, *, receive_maximum: int = 65535
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        # The generator writes many small packets; never let Nagle hold them.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        props = b"\x21" + receive_maximum.to_bytes(2, "big")
        var = _utf8("MQTT") + bytes([5, 0x02]) + (600).to_bytes(2, "big")
        var += remaining_length(len(props)) + props
        body = var + _utf8(client_id)
        self.sock.sendall(bytes([CONNECT]) + remaining_length(len(body)) + body)
        kind, packet = self._read_packet()
        if kind != CONNACK or packet[1] >= 0x80:
            raise ConnectionError(f"CONNACK refused: {packet[:2]!r}")
        self.broker_receive_maximum = _connack_receive_maximum(packet)
        self.sock.settimeout(None)
        self._buffer = b""

    def _read_packet(self) -> tuple[int, bytes]:
        head = self._recv_exact(2)
        first, length, shift = head[0], 0, 0
        byte = head[1]
        while True:
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            byte = self._recv_exact(1)[0]
        return first & 0xF0, self._recv_exact(length)

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def subscribe(self, topics: Sequence[str]) -> None:
        body = (1).to_bytes(2, "big") + b"\x00"
        for topic in topics:
            body += _utf8(topic) + b"\x01"  # QoS 1
        self.sock.sendall(bytes([SUBSCRIBE]) + remaining_length(len(body)) + body)
        kind, packet = self._read_packet()
        if kind != SUBACK or any(code >= 0x80 for code in packet[3:]):
            raise ConnectionError(f"SUBACK refused: {packet!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(DISCONNECT)
        self.sock.close()


def _connack_receive_maximum(packet: bytes) -> int:
    props_len, i = read_varint(packet, 2)
    end = i + props_len
    while i < end:
        prop = packet[i]
        i += 1
        if prop == 0x21:
            return int.from_bytes(packet[i : i + 2], "big")
        if prop in _PROP_BYTE:
            i += 1
        elif prop in _PROP_U16:
            i += 2
        elif prop in _PROP_U32:
            i += 4
        elif prop in _PROP_STR:
            i += 2 + int.from_bytes(packet[i : i + 2], "big")
        elif prop == _PROP_PAIR:
            for _ in range(2):
                i += 2 + int.from_bytes(packet[i : i + 2], "big")
        elif prop == _PROP_VARINT:
            i = read_varint(packet, i)[1]
        else:
            break
    return 65535


class Publisher:
    """QoS 1 publisher: pre-encoded packets, a window of unacknowledged ones.

    Packet ids are baked in as `index % 65535 + 1`; the window stays below
    65535, so an id is never reused while still in flight.
    """

    def __init__(self, host: str, port: int, client_id: str, window: int = 1000) -> None:
        self.conn = Connection(host, port, client_id)
        self.window = min(window, self.conn.broker_receive_maximum, 60000)
        self.acked = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()

    @staticmethod
    def packet_id(index: int) -> int:
        return index % 65535 + 1

    def _read_acks(self) -> None:
        sock, buf = self.conn.sock, b""
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            i, n, count = 0, len(buf), 0
            while n - i >= 2:
                length, j = read_varint(buf, i + 1)
                if j + length > n:
                    break
                if buf[i] & 0xF0 == PUBACK:
                    count += 1
                i = j + length
            buf = buf[i:]
            if count:
                with self._cond:
                    self.acked += count
                    self._cond.notify_all()

    def send(
        self,
        packets: Sequence[bytes],
        sent_at: list[float],
        *,
        rate: float | None = None,
        batch: int = 256,
    ) -> None:
        """Send every packet (flood when rate is None, else paced), recording send times."""
        sock, n, i = self.conn.sock, len(packets), 0
        clock = time.perf_counter
        start = clock() + 0.02
        while i < n:
            with self._cond:
                while i - self.acked >= self.window:
                    self._cond.wait()
                room = self.window - (i - self.acked)
            j = min(n, i + min(room, batch))
            if rate is not None:
                now = clock()
                due = start + i / rate
                if now < due:
                    time.sleep(min(due - now, 0.0005))
                    continue
                # Everything due now goes out in one write.
                j = min(j, max(i + 1, int((now - start) * rate) + 1))
            now = clock()
            sock.sendall(b"".join(packets[i:j]))
            sent_at[i:j] = [now] * (j - i)
            i = j
        with self._cond:
            self._cond.wait_for(lambda: self.acked >= n, timeout=30)

    def close(self) -> None:
        self.conn.close()


class Receiver:
    """QoS 1 subscriber that timestamps each message on arrival and PUBACKs in batches.

    Data messages are recorded as (header.seq, arrival); messages whose topic
    ends with `side_suffix` are kept whole (settings confirmations).
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        topics: Sequence[str],
        *,
        side_suffix: bytes = b"",
    ) -> None:
        self.conn = Connection(host, port, client_id)
        self.conn.subscribe(topics)
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.side: list[tuple[str, bytes, float]] = []
        self.target_seq = -1
        self.done = threading.Event()
        self._side_suffix = side_suffix
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def expect(self, seq: int) -> None:
        """Set `done` once a message with this seq arrives."""
        self.target_seq = seq
        self.done.clear()

    def _run(self) -> None:
        sock, buf = self.conn.sock, b""
        clock = time.perf_counter
        seqs, times, side, suffix = self.seqs, self.times, self.side, self._side_suffix
        while True:
            try:
                chunk = sock.recv(1 << 18)
            except OSError:
                return
            if not chunk:
                return
            now = clock()
            buf += chunk
            i, n = 0, len(buf)
            acks = []
            while n - i >= 2:
                length, j = read_varint(buf, i + 1)
                end = j + length
                if end > n:
                    break
                first = buf[i]
                if first & 0xF0 == PUBLISH:
                    tlen = (buf[j] << 8) | buf[j + 1]
                    k = j + 2 + tlen
                    topic_end = k
                    if first & 0x06:
                        acks.append(b"\x40\x02" + buf[k : k + 2])
                        k += 2
                    plen, k = read_varint(buf, k)
                    payload = buf[k + plen : end]
                    if suffix and buf[j + 2 : topic_end].endswith(suffix):
                        side.append((buf[j + 2 : topic_end].decode(), payload, now))
                    else:
                        seq = header_seq(payload)
                        seqs.append(seq)
                        times.append(now)
                        if seq == self.target_seq:
                            self.done.set()
                i = end
            buf = buf[i:]
            if acks:
                try:
                    sock.sendall(b"".join(acks))
                except OSError:  # closed while this batch was read: the run is over
                    return

    def close(self) -> None:
        """DISCONNECT, then wait for the reading thread to stop before the
        socket is closed under it."""
        with contextlib.suppress(OSError):
            self.conn.sock.sendall(DISCONNECT)
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self.conn.close()
