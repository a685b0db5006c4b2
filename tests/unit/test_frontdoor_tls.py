"""The front door's TLS: the files it is given are checked, HAProxy takes the rendered binds,
and a real HAProxy speaks TLS only (mutual TLS with a client CA)."""

import subprocess

import pytest
import requests

from cluster.config import FleetConfig, TlsOptions, load_config
from cluster.frontdoor.haproxy import FrontDoor, haproxy_binary
from cluster.frontdoor.routes import GrpcFrontend, Route, Server, TlsFiles, render_config
from cluster.frontdoor.tls import read_tls
from cluster.net import free_port
from tests.tls_certs import make_certs
from tests.unit.test_frontdoor import _Named
from workers.errors import InvalidConfig

needs_haproxy = pytest.mark.skipif(haproxy_binary() is None, reason="HAProxy is not installed (ray[serve] brings it)")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_tls_options_go_together_and_need_the_front_door(tmp_path):
    with pytest.raises(ValueError, match="tls.cert and tls.key go together"):
        TlsOptions(cert="server.pem")
    with pytest.raises(ValueError, match="needs tls.cert and tls.key"):
        TlsOptions(client_ca="ca.pem")
    with pytest.raises(ValueError, match="needs front_door: true"):
        FleetConfig(tls=TlsOptions(cert="s.pem", key="s.key"), front_door=False)
    config = tmp_path / "fleet.yaml"
    config.write_text("tls:\n  cert: certs/server.pem\n  key: certs/server.key\n")
    loaded = load_config(config)  # relative paths: from the directory `fleet up` runs in
    assert loaded.tls.cert.endswith("/certs/server.pem") and loaded.tls.cert.startswith("/")
    assert loaded.url.startswith("https://127.0.0.1:")


def test_the_files_are_checked_before_anything_starts(certs, tmp_path):
    material = read_tls(TlsOptions(cert=str(certs.server_cert), key=str(certs.server_key), client_ca=str(certs.ca)))
    assert b"BEGIN CERTIFICATE" in material.pem and b"PRIVATE KEY" in material.pem and material.client_ca
    assert read_tls(TlsOptions()) is None
    with pytest.raises(InvalidConfig, match="tls.key: cannot read /nowhere.key"):
        read_tls(TlsOptions(cert=str(certs.server_cert), key="/nowhere.key"))
    with pytest.raises(InvalidConfig, match="do not make a usable pair"):
        read_tls(TlsOptions(cert=str(certs.server_cert), key=str(certs.client_key)))
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate")
    with pytest.raises(InvalidConfig, match="tls.client_ca .* holds no usable CA certificate"):
        read_tls(TlsOptions(cert=str(certs.server_cert), key=str(certs.server_key), client_ca=str(not_pem)))


def test_both_frontends_speak_tls_only():
    routes = [Route("m", "1", True, (Server("w0", "127.0.0.1", 1001, 1002),))]
    text = render_config(routes, bind=("0.0.0.0", 8000), ingress=("127.0.0.1", 9000), admin_socket="/tmp/a.sock",
                         grpc=GrpcFrontend(("0.0.0.0", 8001), ("127.0.0.1", 9001)), tls=TlsFiles("/d/tls.pem", "/d/ca.pem"))
    binds = [line.strip() for line in text.splitlines() if line.strip().startswith("bind ")]
    assert binds == [
        "bind 0.0.0.0:8000 ssl crt /d/tls.pem alpn http/1.1 ca-file /d/ca.pem verify required",
        "bind 0.0.0.0:8001 ssl crt /d/tls.pem alpn h2 ca-file /d/ca.pem verify required proto h2",
    ]


@needs_haproxy
def test_haproxy_checks_and_serves_the_tls_config(certs, tmp_path):
    backend = _Named("worker")
    port = free_port()
    door = FrontDoor(("127.0.0.1", port), ("127.0.0.1", backend.port),
                     tls=read_tls(TlsOptions(cert=str(certs.server_cert), key=str(certs.server_key), client_ca=str(certs.ca))))
    try:
        door.start([Route("m", "1", True, (Server("w0", "127.0.0.1", backend.port),))])
        check = subprocess.run([haproxy_binary(), "-c", "-f", str(door.config_path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        url = f"https://127.0.0.1:{port}/v2/models/m/infer"
        client = (str(certs.client_cert), str(certs.client_key))
        assert requests.post(url, data=b"{}", verify=str(certs.ca), cert=client, timeout=10).text.startswith("worker")
        with pytest.raises(requests.exceptions.SSLError):  # mutual TLS: no client certificate, no answer
            requests.post(url, data=b"{}", verify=str(certs.ca), timeout=10)
        with pytest.raises(requests.ConnectionError):  # and nothing answers plain HTTP
            requests.post(f"http://127.0.0.1:{port}/v2/models/m/infer", data=b"{}", timeout=10)
        assert (door.dir / "tls.pem").stat().st_mode & 0o077 == 0  # the key is readable by its owner only
    finally:
        door.stop()
        backend.shutdown()
