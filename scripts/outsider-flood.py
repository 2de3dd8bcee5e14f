#!/usr/bin/env python3
"""An outsider flooding one room: a WebSocket client that never joins it and sends
`sendMessage` to it as fast as TCP allows, reconnecting when closed, until SECONDS pass.

    python3 scripts/outsider-flood.py HOST PORT ROOM SECONDS [PAYLOAD_BYTES]

Prints how many messages it wrote. Frames are masked with the all-zero key (valid, and the
payload needs no XOR), and written in batches of 256 so the server's throttling shows up as
TCP backpressure here.
"""
import json, socket, sys, time


def frame(text: bytes) -> bytes:
    n = len(text)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + text


def connect(host, port):
    s = socket.create_connection((host, port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1024)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    return s


def main():
    host, port, room, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    payload = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    message = "flood:" + "x" * max(0, payload - 6)
    batch = frame(json.dumps({"type": "sendMessage", "roomId": room, "message": message}).encode()) * 256
    end = time.monotonic() + seconds
    written = connects = 0
    while time.monotonic() < end:
        try:
            s = connect(host, port)
            connects += 1
            s.settimeout(max(0.1, end - time.monotonic()))
            while time.monotonic() < end:
                s.sendall(batch)
                written += 256
            s.close()
        except (OSError, ConnectionError):
            time.sleep(0.05)
    print(json.dumps({"written": written, "connects": connects}))


main()
