"""URL fetch: private addresses refused (also behind names and redirects), the allow-list, pinning, caps."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import fetch
from core.errors import PayloadTooLarge, ValidationFailed
from core.fetch import fetch_url, forbidden_reason, host_allowed, open_url, precheck_url

FIELD = "input_images.0.url"
BODY = b"\x89PNG\r\n\x1a\n" + b"pretend image " * 100


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes of the local test server; every request is recorded on the server."""

    server: TestServer

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host", "")))
        self.server.accepts.append(self.headers.get("Accept", ""))
        route = self.path.split("?", 1)[0]
        if route == "/image":
            self._send(200, BODY, {"Content-Type": "image/png"})
        elif route == "/big":
            self._send(200, b"x" * 100_000)
        elif route == "/big-unannounced":
            # No Content-Length: HTTP/1.0 style, the body ends when the connection closes.
            self.send_response(200)
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"y" * 1000)
            self.close_connection = True
        elif route == "/slow":
            time.sleep(3)
            self._send(200, BODY)
        elif route == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(100):
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.1)
        elif route == "/gzip":
            self._send(200, b"\x1f\x8b compressed", {"Content-Encoding": "gzip"})
        elif route == "/missing":
            self._send(404, b"no")
        elif route == "/redirect":
            target = self.path.split("?to=", 1)[1]
            self._send(302, b"", {"Location": target})
        else:
            self._send(500, b"unknown route")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # The client may have given up first (the timeout tests), as intended.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class TestServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server on 127.0.0.1 that records (path, Host header) of each request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[tuple[str, str]] = []
        self.accepts: list[str] = []  # the Accept header of each request

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self.server_address[1])


def serve(server: TestServer) -> Iterator[TestServer]:
    """Run ``server`` in a thread for the duration of a fixture."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def server() -> Iterator[TestServer]:
    """A plain HTTP server on 127.0.0.1."""
    yield from serve(TestServer())


@pytest.fixture(autouse=True)
def fresh_log(server: TestServer) -> None:
    """Each test starts with an empty request log."""
    server.seen.clear()


class FakeResolver:
    """Stands in for ``core.fetch.resolve``: names map to the addresses set in ``table``; calls are logged."""

    def __init__(self) -> None:
        self.table: dict[str, list[str]] = {}
        self.calls: list[str] = []

    def __setitem__(self, host: str, addresses: list[str]) -> None:
        self.table[host] = addresses

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(f"test resolver: unknown host {host}")
        return self.table[host]


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    """Replace this module's resolver (only core.fetch's, never the socket module)."""
    resolver = FakeResolver()
    monkeypatch.setattr(fetch, "resolve", resolver)
    return resolver


def refused(url: str, *, message: str = "", **kwargs: object) -> ValidationFailed:
    """Assert the fetch is refused with a ValidationFailed naming the field (and containing ``message``)."""
    with pytest.raises(ValidationFailed) as info:
        fetch_url(url, field=FIELD, timeout_s=kwargs.pop("timeout_s", 5.0), **kwargs)  # type: ignore[arg-type]
    assert info.value.details[0]["field"] == FIELD
    assert message in info.value.message
    return info.value


# --- address classes ------------------------------------------------------------------------------------

FORBIDDEN = [
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.0.1",
    "169.254.169.254",  # AWS / GCP / Azure / Oracle metadata
    "169.254.0.1",
    "100.100.100.200",  # Alibaba Cloud metadata (shared address space)
    "100.64.0.1",
    "168.63.129.16",  # Azure WireServer
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.0.8",
    "192.0.2.1",
    "198.18.0.1",
    "::",
    "::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001:db8::1",
    "fc00::1",
    "fd00:ec2::254",  # AWS metadata over IPv6
    "fe80::1",
    "fe80::1%1",
    "fec0::1",
    "ff02::1",
]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_every_non_public_address_class_is_forbidden(address: str) -> None:
    assert forbidden_reason(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert forbidden_reason(address) is None


@pytest.mark.parametrize("address", FORBIDDEN)
def test_a_name_resolving_to_any_forbidden_class_is_refused_before_connecting(
    address: str, lookups: FakeResolver, server: TestServer
) -> None:
    lookups["images.example.com"] = [address]
    refused(f"https://images.example.com:{server.port}/image", message="resolves to")
    assert server.seen == []


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "10.0.0.1", "169.254.169.254", "[fd00:ec2::254]"])
def test_literal_private_addresses_are_refused(host: str, server: TestServer) -> None:
    refused(f"https://{host}:{server.port}/image", message="points at")
    assert server.seen == []


# --- loopback and names ---------------------------------------------------------------------------------


def test_loopback_server_is_refused(server: TestServer) -> None:
    refused(f"https://127.0.0.1:{server.port}/image")
    refused(f"http://127.0.0.1:{server.port}/image")
    assert server.seen == []


def test_public_looking_name_resolving_to_loopback_is_refused(lookups: FakeResolver, server: TestServer) -> None:
    lookups["cdn.images-example.com"] = ["127.0.0.1"]
    error = refused(f"https://cdn.images-example.com:{server.port}/image", message="loopback")
    assert "127.0.0.1" in error.message
    assert server.seen == []


def test_one_private_answer_among_public_ones_is_enough_to_refuse(lookups: FakeResolver) -> None:
    lookups["mixed.example.com"] = ["93.184.215.14", "127.0.0.1"]
    refused("https://mixed.example.com/image", message="loopback")


def test_numeric_host_spellings_are_judged_by_what_they_resolve_to(server: TestServer) -> None:
    # 2130706433 and 0x7f.1 are 127.0.0.1 to the system resolver (inet_aton forms).
    refused(f"https://2130706433:{server.port}/image", message="loopback")
    refused(f"https://127.1:{server.port}/image", message="loopback")
    assert server.seen == []


def test_unresolvable_name_is_refused(lookups: FakeResolver) -> None:
    refused("https://nowhere.invalid/image", message="does not resolve")


# --- scheme and shape -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://images.example.com/a.png",
        "ftp://images.example.com/a.png",
        "file:///etc/passwd",
        "gopher://images.example.com/",
        "https://user:secret@images.example.com/a.png",
        "https:///a.png",
        "not a url at all",
    ],
)
def test_only_plain_https_urls_are_fetched(url: str, lookups: FakeResolver) -> None:
    refused(url)
    assert lookups.calls == []  # refused before any lookup


def test_precheck_needs_no_network() -> None:
    assert precheck_url("https://images.example.com/a.png", field=FIELD).host == "images.example.com"
    with pytest.raises(ValidationFailed):
        precheck_url("https://10.1.2.3/a.png", field=FIELD)
    assert precheck_url("http://10.1.2.3/a.png", field=FIELD, allow_hosts=["10.1.2.3"]).port is None


def test_allow_list_matching() -> None:
    assert host_allowed("cdn.example.com", ["CDN.example.com."])
    assert host_allowed("a.b.example.com", ["*.example.com"])
    assert not host_allowed("example.com", ["*.example.com"])
    assert not host_allowed("evil-example.com", ["*.example.com"])
    assert not host_allowed("cdn.example.com.evil.net", ["cdn.example.com"])


# --- the allow-list lets a test host through, pinned to the checked address ----------------------------


def test_allow_listed_loopback_host_is_fetched_over_http(server: TestServer) -> None:
    got = fetch_url(f"http://127.0.0.1:{server.port}/image", field=FIELD, allow_hosts=["127.0.0.1"])
    assert got.data == BODY
    assert got.content_type == "image/png"
    assert server.seen == [("/image", f"127.0.0.1:{server.port}")]


def test_allow_listed_name_connects_to_the_address_resolved_once(lookups: FakeResolver, server: TestServer) -> None:
    # images.test is not in any real DNS: the request can only arrive if it went to the pinned address.
    lookups["images.test"] = ["127.0.0.1"]
    got = fetch_url(f"http://images.test:{server.port}/image", field=FIELD, allow_hosts=["images.test"])
    assert got.data == BODY
    assert lookups.calls == ["images.test"]
    assert server.seen == [("/image", f"images.test:{server.port}")]  # the name kept in the Host header


# --- redirects ------------------------------------------------------------------------------------------


def test_redirect_from_an_allowed_host_to_a_private_address_is_refused(server: TestServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    refused(f"{base}/redirect?to=https://10.0.0.1/secret", allow_hosts=["127.0.0.1"], message="10.0.0.1")
    refused(f"{base}/redirect?to=http://169.254.169.254/latest/", allow_hosts=["127.0.0.1"], message="https")
    refused(f"{base}/redirect?to=https://[fd00:ec2::254]/latest/", allow_hosts=["127.0.0.1"], message="fd00")
    assert len(server.seen) == 3  # each first hop was served; no refused hop ever was


def test_redirect_to_a_name_resolving_to_a_private_address_is_refused(
    lookups: FakeResolver, server: TestServer
) -> None:
    lookups["images.test"] = ["127.0.0.1"]
    lookups["internal.example.com"] = ["192.168.1.20"]
    url = f"http://images.test:{server.port}/redirect?to=https://internal.example.com/x"
    refused(url, allow_hosts=["images.test"], message="192.168.1.20")


def test_redirect_to_plain_http_of_a_public_host_is_refused(server: TestServer) -> None:
    url = f"http://127.0.0.1:{server.port}/redirect?to=http://images.example.com/a.png"
    refused(url, allow_hosts=["127.0.0.1"], message="https")


def test_allowed_redirects_are_followed_and_capped(server: TestServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    got = fetch_url(f"{base}/redirect?to=/image", field=FIELD, allow_hosts=["127.0.0.1"])
    assert got.data == BODY and got.url.endswith("/image")
    three = "/redirect?to=" * 3 + "/image"
    assert fetch_url(base + three, field=FIELD, allow_hosts=["127.0.0.1"]).data == BODY
    server.seen.clear()
    refused(base + "/redirect?to=" * 4 + "/image", allow_hosts=["127.0.0.1"], message="redirected more than 3")
    assert len(server.seen) == 4


# --- size, time, encoding, status ----------------------------------------------------------------------


def test_declared_size_over_the_cap_is_refused(server: TestServer) -> None:
    refused(f"http://127.0.0.1:{server.port}/big", allow_hosts=["127.0.0.1"], max_bytes=10_000, message="limit")


def test_streamed_size_over_the_cap_is_refused(server: TestServer) -> None:
    url = f"http://127.0.0.1:{server.port}/big-unannounced"
    refused(url, allow_hosts=["127.0.0.1"], max_bytes=10_000, message="limit")
    assert len(fetch_url(url, field=FIELD, allow_hosts=["127.0.0.1"], max_bytes=200_000).data) == 100_000


def test_open_url_streams_the_body_in_pieces_and_sends_the_callers_accept(server: TestServer) -> None:
    url = f"http://127.0.0.1:{server.port}/big-unannounced"
    with open_url(url, field=FIELD, allow_hosts=["127.0.0.1"], accept="application/octet-stream") as body:
        pieces = list(body.pieces())
        assert body.url == url
    assert sum(len(p) for p in pieces) == 100_000 and len(pieces) > 1  # handed over as they arrived
    assert server.accepts[-1] == "application/octet-stream"
    assert fetch_url(f"http://127.0.0.1:{server.port}/image", field=FIELD, allow_hosts=["127.0.0.1"]).data == BODY
    assert server.accepts[-1] == "image/png, image/jpeg, image/webp"


def test_open_url_raises_the_callers_class_for_a_body_over_the_cap(server: TestServer) -> None:
    for route in ("/big", "/big-unannounced"):  # declared, and found while streaming
        with pytest.raises(PayloadTooLarge) as info:
            url = f"http://127.0.0.1:{server.port}{route}"
            with open_url(
                url, field="url", allow_hosts=["127.0.0.1"], max_bytes=10_000, too_large=PayloadTooLarge
            ) as b:
                for _ in b.pieces():
                    pass
        assert info.value.details[0]["field"] == "url" and "limit" in info.value.message


def test_slow_server_times_out(server: TestServer) -> None:
    started = time.monotonic()
    refused(f"http://127.0.0.1:{server.port}/slow", allow_hosts=["127.0.0.1"], timeout_s=0.5, message="0.5 s")
    assert time.monotonic() - started < 2


def test_dripping_server_is_cut_at_the_deadline(server: TestServer) -> None:
    started = time.monotonic()
    refused(f"http://127.0.0.1:{server.port}/drip", allow_hosts=["127.0.0.1"], timeout_s=0.5)
    assert time.monotonic() - started < 2  # the whole body would take 10 s


def test_compressed_answers_and_errors_are_refused(server: TestServer) -> None:
    refused(f"http://127.0.0.1:{server.port}/gzip", allow_hosts=["127.0.0.1"], message="compressed")
    refused(f"http://127.0.0.1:{server.port}/missing", allow_hosts=["127.0.0.1"], message="404")


def test_closed_port_is_a_refusal_not_a_crash() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused(f"http://127.0.0.1:{port}/image", allow_hosts=["127.0.0.1"], message="could not be fetched")


# --- TLS: the pinned connection still verifies the certificate for the name -----------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestServer, Path]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for images.test; yields it and the cert."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.test",
         "-addext", "subjectAltName=DNS:images.test"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server = TestServer()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for running in serve(server):
        yield running, cert


def test_https_goes_to_the_pinned_address_with_sni_and_certificate_of_the_name(
    tls_server: tuple[TestServer, Path], lookups: FakeResolver
) -> None:
    server, cert = tls_server
    trust = ssl.create_default_context(cafile=str(cert))
    lookups["images.test"] = ["127.0.0.1"]
    got = fetch_url(
        f"https://images.test:{server.port}/image", field=FIELD, allow_hosts=["images.test"], ssl_context=trust
    )
    assert got.data == BODY
    assert server.seen == [("/image", f"images.test:{server.port}")]
    # The certificate is checked against the name: the same server reached under another name fails.
    lookups["other.test"] = ["127.0.0.1"]
    refused(f"https://other.test:{server.port}/image", allow_hosts=["other.test"], ssl_context=trust, message="fetched")
