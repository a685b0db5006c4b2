"""The worker's own HTTP endpoint, without Ray: real HTTP server, real ONNX Runtime, real sockets."""

import gzip
import http.server
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import requests

from cluster.buildfarm import build_locally, local_target
from cluster.repository import Repository
from cluster.forward import IngressForwarder
from workers.actor import FleetWorker, WorkerSpec
from workers.build import BuildRequest
from workers.http import HttpOptions, parse_infer_path
from workers.kserve.client_codec import decode_response, encode_request
from workers.kserve.codec import InferRequest
from workers.kserve.handler import InferPolicy
from workers.manifest import sha256_file
from workers.messages import LoadOptions


class _Ingress(http.server.ThreadingHTTPServer):
    """Stands in for the Serve ingress: records what was passed on and answers 503 JSON."""

    def __init__(self) -> None:
        self.seen: list = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.seen.append((self.path, self.headers, body))  # case-insensitive lookups
                answer = json.dumps({"error": "model 'nope' is not in the repository"}).encode()
                self.send_response(404)
                self.send_header("content-type", "application/json")
                self.send_header("x-fleet-error", "ModelNotFound")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_models):
    repo = Repository(tmp_path_factory.mktemp("repo"))
    for name, path in demo_models.items():
        build_locally(repo, BuildRequest(str(path), name, local_target(), max_batch=64), sha256_file(path))
    ingress = _Ingress()
    worker = FleetWorker(WorkerSpec("w0", budget_bytes=1 << 30))
    for name in demo_models:
        (a,) = repo.artifacts(name)
        worker.load(a.manifest, repo.object_source(a.manifest), LoadOptions(reject_non_finite=name == "digits-mlp"))
    # three event loops on one listening socket (worker_http_loops; the default is one): every test
    # here runs across them
    host, port = worker.start_http(HttpOptions(policy=InferPolicy(max_request_bytes=4 << 20), loops=3),
                                   on_miss=IngressForwarder(f"http://127.0.0.1:{ingress.server_address[1]}"))
    yield worker, f"http://{host}:{port}", ingress
    worker.shutdown()
    ingress.shutdown()


def _post(url, inputs, binary=True, **kwargs):
    body, headers = encode_request(inputs, binary=binary)
    return requests.post(url, data=body, headers=headers, timeout=30, **kwargs)


def test_paths():
    assert parse_infer_path("/v2/models/m/infer") == ("m", None)
    assert parse_infer_path("/v2/models/m/versions/3/infer") == ("m", "3")
    assert parse_infer_path("/v2/models/m") is None
    assert parse_infer_path("/v2/models/m/versions/3/ready") is None


@pytest.mark.parametrize("binary", [True, False])
def test_answers_equal_onnxruntime(served, demo_models, digits_test, binary):
    _, url, _ = served
    X = digits_test[0][:16]
    r = _post(f"{url}/v2/models/digits-mlp/infer", {"input": X}, binary=binary)
    assert r.status_code == 200, r.text
    header, outputs = decode_response(r.content, r.headers.get("inference-header-content-length"))
    ref = ort.InferenceSession(str(demo_models["digits-mlp"])).run(None, {"input": X})
    np.testing.assert_array_equal(outputs["label"], ref[0])
    np.testing.assert_allclose(outputs["probabilities"], ref[1], rtol=1e-6)
    assert header["model_version"] == "1" and header["parameters"]["fleet_worker"] == "w0"


def test_concurrent_requests_are_batched_and_correct(served, digits_test):
    worker, url, _ = served
    X = digits_test[0]
    key = worker.runner.engine_key("digits-mlp")
    expected = worker.infer("digits-mlp", InferRequest({"input": X[:320]})).outputs["label"]
    before = worker.runner.engine_stats()[key]

    def one(i):
        r = _post(f"{url}/v2/models/digits-mlp/versions/1/infer", {"input": X[i : i + 1]})
        return decode_response(r.content, r.headers.get("inference-header-content-length"))[1]["label"][0]

    with ThreadPoolExecutor(16) as pool:
        labels = list(pool.map(one, range(320)))
    assert labels == list(expected)
    after = worker.runner.engine_stats()[key]
    assert after["success"] - before["success"] == 320
    assert after["exec_count"] - before["exec_count"] < 320  # requests shared engine runs
    stats = worker.request_stats.report()["models"]["digits-mlp"]
    assert stats["success"] >= 320


def test_connections_are_spread_over_the_event_loops(served, digits_test):
    """Each loop accepts on the one listening socket: many connections at once are served by more
    than one of them, each answer correct, and the in-flight count comes back to zero."""
    worker, url, _ = served
    server = worker._http
    seen: set[str] = set()
    real = server.handle

    async def recording(request):
        seen.add(threading.current_thread().name)
        return await real(request)

    server.handle = recording  # read per connection: the connections below use it
    X = digits_test[0][:4].astype(np.float32)
    expected = _post(url + "/v2/models/digits-mlp/infer", {"input": X}).content
    try:
        def one(_):
            with requests.Session() as session:
                body, headers = encode_request({"input": X})
                answers = [session.post(url + "/v2/models/digits-mlp/infer", data=body, headers=headers, timeout=30)
                           for _ in range(3)]
            return [(a.status_code, a.content) for a in answers]

        with ThreadPoolExecutor(24) as pool:
            results = [r for rs in pool.map(one, range(48)) for r in rs]
    finally:
        server.handle = real
    assert all(status == 200 and content == expected for status, content in results)
    assert len(seen) >= 2 and seen <= {"worker-http", "worker-http-1", "worker-http-2"}, seen
    assert server.active == 0


def test_bad_requests_get_their_4xx_and_the_worker_keeps_serving(served, digits_test):
    _, url, _ = served
    infer = f"{url}/v2/models/digits-mlp/infer"
    r = requests.post(infer, data=b"{", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert r.headers["x-fleet-error"] == "InvalidInput"
    r = _post(infer, {"input": np.zeros((1, 3), np.float32)})
    assert r.status_code == 400 and "input" in r.json()["error"]
    r = _post(infer, {"input": np.full((1, 64), np.nan, np.float32)})  # reject_non_finite for this model
    assert r.status_code == 400 and "finite" in r.json()["error"].lower()
    r = requests.post(infer, data=b"x" * (5 << 20), timeout=10)
    assert r.status_code == 413
    r = requests.post(f"{url}/v2/models/..%2Fetc/infer", data=b"{}", timeout=10)
    assert r.status_code in (400, 404)
    assert requests.get(infer, timeout=10).status_code == 404
    body, headers = encode_request({"input": digits_test[0][:2]}, binary=True)
    r = requests.post(infer, data=gzip.compress(body), headers=dict(headers, **{"Content-Encoding": "gzip"}), timeout=10)
    assert r.status_code == 200


def test_a_model_not_held_here_is_passed_on_to_the_ingress(served):
    _, url, ingress = served
    r = requests.post(f"{url}/v2/models/nope/infer", data=b'{"inputs": []}',
                      headers={"Content-Type": "application/json", "Authorization": "Bearer t"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"].startswith("model 'nope'")
    assert r.headers["x-fleet-error"] == "ModelNotFound"
    path, headers, body = ingress.seen[-1]
    assert path == "/v2/models/nope/infer" and body == b'{"inputs": []}'
    assert headers["Authorization"] == "Bearer t"


def test_inference_token(tmp_path, demo_models, digits_test):
    repo = Repository(tmp_path)
    path = demo_models["digits-mlp"]
    build_locally(repo, BuildRequest(str(path), "digits-mlp", local_target()), sha256_file(path))
    (a,) = repo.artifacts("digits-mlp")
    worker = FleetWorker(WorkerSpec("w1", budget_bytes=1 << 30))
    worker.load(a.manifest, repo.object_source(a.manifest))
    _, port = worker.start_http(HttpOptions(policy=InferPolicy(auth_token="s3cret", auth_inference=True)))
    try:
        infer = f"http://127.0.0.1:{port}/v2/models/digits-mlp/infer"
        assert _post(infer, {"input": digits_test[0][:1]}).status_code == 401
        body, headers = encode_request({"input": digits_test[0][:1]})
        wrong = requests.post(infer, data=body, headers=dict(headers, Authorization="Bearer guess"), timeout=10)
        assert wrong.status_code == 401 and wrong.headers["x-fleet-error"] == "Unauthorized"
        ok = requests.post(infer, data=body, headers=dict(headers, Authorization="Bearer s3cret"), timeout=10)
        assert ok.status_code == 200
    finally:
        worker.shutdown()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2)


def _raw(url: str, data: bytes, read_until: int, timeout: float = 10) -> bytes:
    """Send raw bytes on one connection; read until ``read_until`` response status lines arrived."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while answer.count(b"HTTP/1.1 ") < read_until:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_http_details_pipelining_chunked_expect_and_early_413(served, digits_test):
    _, url, _ = served
    body, headers = encode_request({"input": digits_test[0][:1]})
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    post = (f"POST /v2/models/digits-mlp/infer HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n").encode() + body
    # two requests in one write: two answers, in order, on the same connection
    answer = _raw(url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + post, read_until=2)
    first, second = answer.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"200") and b'{"live": true}' in first
    assert second.startswith(b"200") and b"fleet_worker" in second
    # a chunked body (no Content-Length)
    r = requests.post(f"{url}/v2/models/digits-mlp/infer", data=iter([body[:100], body[100:]]), headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    # Expect: 100-continue gets its interim answer, then the real one
    expect = post.replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n")
    answer = _raw(url, expect, read_until=2)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
    # over the limit by its declared length: 413 at once, connection closed, body never read
    answer = _raw(url, b"POST /v2/models/digits-mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
                  read_until=1)
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer
    # garbage is a 400, and the server goes on
    assert _raw(url, b"NOT HTTP AT ALL\r\n\r\n", read_until=1).startswith(b"HTTP/1.1 400")
    assert requests.get(f"{url}/v2/health/live", timeout=10).json() == {"live": True}


def test_an_engine_evicted_after_the_lookup_is_passed_on_not_refused(served, monkeypatch, digits_test):
    """The worker saw the engine, then it was evicted before the request began: the request goes
    on to the ingress like any other miss (it used to get a 503)."""
    worker, url, ingress = served
    seen = len(ingress.seen)
    monkeypatch.setattr(worker.runner, "engine_key", lambda model, version=None: "evicted-a-moment-ago")
    r = _post(f"{url}/v2/models/gone/infer", {"input": digits_test[0][:1]})
    assert r.status_code == 404 and r.headers["x-fleet-error"] == "ModelNotFound", r.text  # the ingress's answer
    assert len(ingress.seen) == seen + 1 and ingress.seen[-1][0] == "/v2/models/gone/infer"


def _read_answers(sock, count: int) -> list[tuple[int, dict, bytes]]:
    """``count`` HTTP/1.1 answers with Content-Length bodies off one socket: (status, headers, body)."""
    buffer, answers = bytearray(), []  # (bytes += bytes would copy the whole buffer per piece)
    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(1 << 16)
            assert chunk, f"connection closed after {len(answers)} answers"
            buffer += chunk
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers["content-length"])
        while len(buffer) < length:
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed inside a body"
            buffer += chunk
        answers.append((int(status_line.split()[1]), headers, bytes(buffer[:length])))
        buffer = buffer[length:]
    return answers


def test_large_bodies_pipelined_or_trickled_are_read_whole(served, demo_models, digits_test):
    """Bodies from 64 KiB are read straight into a buffer of their own (httpwire.DIRECT_BYTES): the
    next request on the connection must start exactly where such a body ends, and a body that
    arrives in small pieces, its head split too, must come out whole."""
    import socket
    import time
    from urllib.parse import urlsplit

    _, url, _ = served
    X = np.tile(digits_test[0], (3, 1))[:600]  # 600 x 64 float32: 150 KiB
    reference = ort.InferenceSession(str(demo_models["digits-mlp"]))
    requests_ = []
    for rows in (X, X[::-1].copy(), X[:1]):  # large, large, small
        body, headers = encode_request({"input": rows})
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        requests_.append((f"POST /v2/models/digits-mlp/infer HTTP/1.1\r\nHost: x\r\n{head}"
                          f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        assert len(body) > (64 << 10) or rows is not X and len(rows) == 1
    expected = [reference.run(None, {"input": rows})[0] for rows in (X, X[::-1], X[:1])]
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(b"".join(requests_))  # three in one write
        answers = _read_answers(sock, 3)
        piece = 1000  # then the first one again, a thousand bytes at a time
        for start in range(0, len(requests_[0]), piece):
            sock.sendall(requests_[0][start:start + piece])
            if start % (50 * piece) == 0:
                time.sleep(0.01)
        answers += _read_answers(sock, 1)
    for (status, headers, content), want in zip(answers, [*expected, expected[0]]):
        assert status == 200, content[:300]
        _, outputs = decode_response(content, headers.get("inference-header-content-length"))
        np.testing.assert_array_equal(outputs["label"], want)


def test_a_large_binary_bodys_tensors_are_read_onto_a_64_byte_boundary():
    """Whatever the length of a binary body's JSON header (149 bytes here), the kernel reads the body so that
    its tensors begin on a 64-byte boundary: the inputs decoded in place are aligned, as fresh arrays are,
    also in the buffer the connection uses again for its next body of the same size."""
    import asyncio

    from workers.httpwire import HttpConnection
    from workers.kserve.codec import decode_request
    from workers.kserve.handler import json_answer

    seen = []

    async def handler(request):
        decoded = decode_request(request.body, request.headers["inference-header-content-length"])
        seen.append((decoded.inputs["input"].ctypes.data % 64, decoded.inputs["input"].sum()))
        return json_answer(200, {})

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(lambda: HttpConnection(handler, 64 << 20), "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        X = np.ones((300, 64), np.float32)  # 75 KiB: read into a buffer of its own
        body, headers = encode_request({"input": X})
        assert int(headers["inference-header-content-length"]) % 4  # the tensor would sit at an odd offset
        port = server.sockets[0].getsockname()[1]
        with requests.Session() as session:
            for _ in range(3):
                assert session.post(f"http://127.0.0.1:{port}/", data=body, headers=headers, timeout=30).status_code == 200
        assert seen == [(0, X.sum())] * 3
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.close()


def test_large_answers_written_past_the_event_loop_arrive_whole_and_in_order():
    """Large answers go to the socket with os.writev (the GIL released while the kernel copies them), and
    what the socket does not take then goes through the event loop's transport. With pipelined requests
    and a client that reads late, answers of 16 MB are split between the two: each must arrive whole,
    in the order asked."""
    import asyncio
    import socket
    import time

    from workers.httpwire import HttpConnection
    from workers.kserve.handler import HttpAnswer

    size = 16 << 20

    async def handler(request):
        fill = int(request.path.rsplit("/", 1)[1])
        return HttpAnswer(200, [("content-type", "application/octet-stream")], b"head",
                          blobs=(memoryview(np.full(size, fill, np.uint8)).cast("B"),))

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(lambda: HttpConnection(handler, 1 << 20), "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        port = server.sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"".join(f"GET /a/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in (1, 2, 3)))
            time.sleep(0.3)  # the answers back up: the socket takes part of the first, the transport the rest
            answers = _read_answers(sock, 3)
        assert [status for status, _, _ in answers] == [200, 200, 200]
        for (_, _, content), fill in zip(answers, (1, 2, 3)):
            assert len(content) == 4 + size and content[:4] == b"head"
            assert content.count(bytes([fill])) == size  # whole, and not another answer's bytes
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.close()
