"""FleetClient and the keep-alive race: a real socket server that closes a reused connection
without answering (as HAProxy does with idle connections when it reloads)."""

import json
import socket
import threading

import pytest

from cluster.client import FleetClient
from workers.errors import FleetError


def _serve(behaviour: str):
    """A one-thread HTTP server. 'drop-second': on each connection, answer the first request and
    close without answering the second. 'drop-all': close every request without answering."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    answered = []

    def run():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                for n in range(2):
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if not data or behaviour == "drop-all" or n == 1:
                        break  # close without a byte of an answer
                    body = json.dumps({"fleet": "test", "n": len(answered)}).encode()
                    answered.append(data.split(b" ")[1])
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))

    threading.Thread(target=run, daemon=True).start()
    return listener, answered


def test_a_reused_connection_closed_without_an_answer_is_sent_again_once():
    listener, answered = _serve("drop-second")
    try:
        with FleetClient(f"http://127.0.0.1:{listener.getsockname()[1]}") as client:
            assert client.status()["n"] == 0
            assert client.status()["n"] == 1  # the kept-alive connection was dropped; sent again on a new one
            assert client.status()["n"] == 2
        assert answered == [b"/v2/fleet/status"] * 3
    finally:
        listener.close()


def test_a_server_that_never_answers_is_still_an_error():
    listener, answered = _serve("drop-all")
    try:
        with FleetClient(f"http://127.0.0.1:{listener.getsockname()[1]}") as client:
            with pytest.raises(FleetError, match="cannot reach the fleet"):
                client.status()
        assert answered == []
    finally:
        listener.close()
