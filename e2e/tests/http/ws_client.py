"""A WebSocket session with Python's `websockets` (sync client), printing
one line per check: the upgrade's status and the headers the backend saw,
a text and a binary echo, a ping's pong, a 10 MiB message, and a close from
the client; with --server-close, a close from the server instead; with
--expect-refusal, only the status the upgrade was refused with.

Usage: ws_client.py URL [--connect HOST:PORT] [--server-close] [--expect-refusal]
"""

import socket
import sys

from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect

TIMEOUT = 20


def main():
    url = sys.argv[1]
    flags = sys.argv[2:]
    sock = None
    if "--connect" in flags:
        host, port = flags[flags.index("--connect") + 1].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    try:
        ws = connect(url, sock=sock, open_timeout=TIMEOUT, close_timeout=TIMEOUT, max_size=None)
    except InvalidStatus as e:
        print(f"refused {e.response.status_code}")
        return
    if "--expect-refusal" in flags:
        print("upgraded")
        return
    with ws:
        print(f"upgraded {ws.response.status_code}")
        print(f"backend saw {ws.response.headers.get('x-request-header-names', '')}")
        print(f"pod {ws.response.headers.get('x-pod', '')}")
        if "--server-close" in flags:
            ws.send("bye")
            print(f"text {ws.recv(timeout=TIMEOUT)}")
            try:
                ws.recv(timeout=TIMEOUT)
                print("no close from the server")
            except ConnectionClosedOK as e:
                print(f"server closed {e.rcvd.code}")
            return
        ws.send("hello")
        print(f"text {ws.recv(timeout=TIMEOUT)}")
        ws.send(bytes(range(256)))
        got = ws.recv(timeout=TIMEOUT)
        print(f"binary {isinstance(got, bytes) and got == bytes(range(256))}")
        pong = ws.ping(b"ping-data")
        print(f"pong {pong.wait(TIMEOUT)}")
        big = b"\x5a" * (10 * 1024 * 1024)
        ws.send(big)
        got = ws.recv(timeout=TIMEOUT)
        print(f"big {len(got)} {got == big}")
        ws.close()
        print(f"closed {ws.close_code}")


if __name__ == "__main__":
    main()
