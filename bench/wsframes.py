"""The client side of WebSocket (RFC 6455), only as much as a load generator needs, written for speed.

A subscriber of the load generator reads tens of thousands of small server frames per second. A general
client library spends most of its time on what a benchmark never uses (extensions, UTF-8 checks, events
and buffers per frame), so the load generator would cost more CPU than the servers it measures. Here a
socket read becomes a list of `(first_byte, payload)` pairs with one slice per frame, and the few frames a
client sends (its subscribe message, pongs, the closing handshake) are masked as the RFC requires.

Server frames must not be masked; a masked one is a protocol error (`ProtocolError`). Permessage-deflate
is never offered, so no frame is compressed.
"""

from __future__ import annotations

import base64
import hashlib
import os

FIN = 0x80
OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ProtocolError(Exception):
    """The server broke the protocol: a bad handshake reply or a frame a client must not receive."""


def handshake_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """The opening GET and the `Sec-WebSocket-Accept` value the server must answer with."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest())
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()
    return request, accept


def check_handshake_reply(head: bytes, accept: bytes) -> None:
    """Raise ProtocolError unless `head` (the reply up to its blank line) accepts the upgrade."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"101":
        raise ProtocolError(f"handshake refused: {lines[0].decode(errors='replace')}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"sec-websocket-accept") != accept:
        raise ProtocolError("handshake reply has a wrong Sec-WebSocket-Accept")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final frame from client to server, masked with a fresh random key."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes((FIN | opcode, 0x80 | length))
    elif length < 65536:
        head = bytes((FIN | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((FIN | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
    return head + mask + masked


def split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete server frames at the start of `data` as (first byte, payload), and the bytes left over.

    The first byte carries FIN (0x80) and the opcode (low four bits).
    """
    frames: list[tuple[int, bytes]] = []
    end = len(data)
    at = 0
    while end - at >= 2:
        length = data[at + 1]
        if length & 0x80:
            raise ProtocolError("the server sent a masked frame")
        start = at + 2
        if length == 126:
            if end - at < 4:
                break
            length = int.from_bytes(data[start : start + 2], "big")
            start += 2
        elif length == 127:
            if end - at < 10:
                break
            length = int.from_bytes(data[start : start + 8], "big")
            start += 8
        stop = start + length
        if stop > end:
            break
        frames.append((data[at], data[start:stop]))
        at = stop
    return frames, data[at:] if at else data


def close_code(payload: bytes) -> int:
    """The status code of a close frame; 1005 when it carries none."""
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
