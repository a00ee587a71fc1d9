"""SSRF-safe download of a client-supplied image URL (``{"url": "https://..."}`` inputs).

Rules, every one applied again on each redirect hop:

- the scheme is https; http, and every address class below, is allowed only for an allow-listed host
  (operator setting: exact names, ``*.example.com`` for subdomains, or IP literals);
- the URL may not carry credentials (``https://user:pass@...``);
- the host name is resolved once, by :func:`resolve` (the seam tests replace); every address it returns must
  be public: loopback, private, shared (CGNAT), link-local, multicast, reserved, unspecified, documentation,
  benchmarking, 6to4/Teredo and cloud metadata addresses (169.254.169.254, fd00:ec2::254, 100.100.100.200,
  168.63.129.16) are refused, IPv4 inside IPv6 (``::ffff:a.b.c.d``, NAT64) judged as the IPv4 it carries;
- the connection goes to the checked address itself, not to the name: the request URL names the IP, while
  the Host header and the TLS SNI / certificate check keep the name, so no second DNS lookup (rebinding) can
  swap the address between check and connect;
- redirects are followed by hand, at most ``max_redirects``;
- one deadline covers the whole fetch; the body is streamed, cut at ``max_bytes`` and taken as sent
  (``Accept-Encoding: identity``; a compressed answer is refused, so no decompression bomb).

Every refusal or failure raises ``ValidationFailed`` naming the caller's field (``input_images.0.url``); a body
over the cap raises the caller's ``too_large`` class (adapters: ``PayloadTooLarge``). ``fetch_url`` reads a body
whole (an image); ``open_url`` hands it over as it streams (an adapter of up to 2 GiB, never held whole).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from core.errors import InvalidInput, ValidationFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_REDIRECTS = 3
_REDIRECTS = {301, 302, 303, 307, 308}
IMAGE_TYPES = "image/png, image/jpeg, image/webp"
_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "zimage-fetch/1"}

# Address blocks never fetched from (IANA special-purpose registries plus cloud platform endpoints), with
# the reason given to the client. ``ipaddress.is_global`` alone is not enough on Python 3.11: it calls
# 224.0.0.1, 192.0.0.8 and 2002:7f00:1:: (6to4 for 127.0.0.1) global.
_FORBIDDEN: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("0.0.0.0/8", "an unspecified address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a shared (carrier NAT) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address (cloud metadata lives there)"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),
        ("168.63.129.16/32", "a cloud platform endpoint"),
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("::/96", "an IPv4-compatible address"),
        ("::ffff:0:0:0/96", "an IPv4-translated address"),
        ("64:ff9b:1::/48", "a local NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001::/23", "an IETF protocol address (Teredo, ORCHID, ...)"),
        ("2001:db8::/32", "a documentation address"),
        ("2002::/16", "a 6to4 address"),
        ("3fff::/20", "a documentation address"),
        ("fc00::/7", "a unique-local (private) address (cloud metadata lives there)"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class Fetched:
    """A downloaded body and where it finally came from."""

    data: bytes
    url: str
    content_type: str | None


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in resolver order (tests replace this function)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def forbidden_reason(address: str) -> str | None:
    """Why the service must not connect to this IP address, or None when it is a public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            return forbidden_reason(str(embedded))
    for network, why in _FORBIDDEN:
        if ip in network:
            return why
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        return "not a public address"
    return None


def host_allowed(host: str, allow_hosts: Collection[str]) -> bool:
    """True when ``host`` is on the allow-list (exact name or IP, or ``*.domain`` for its subdomains)."""
    host = host.lower().rstrip(".")
    for entry in allow_hosts:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
        if host == entry:
            return True
    return False


def precheck_url(url: str, *, field: str, allow_hosts: Collection[str] = ()) -> httpx.URL:
    """Check a URL without any network access (scheme, credentials, literal IPs); returns it parsed."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise _refused(field, "is not a valid URL") from None
    host = parsed.raw_host.decode("ascii", "replace")
    if not host:
        raise _refused(field, "has no host")
    allowed = host_allowed(host, allow_hosts)
    if parsed.scheme != "https" and not (parsed.scheme == "http" and allowed):
        raise _refused(field, "must be an https URL")
    if parsed.userinfo:
        raise _refused(field, "must not carry credentials")
    if not allowed and _is_ip(host):
        why = forbidden_reason(host)
        if why is not None:
            raise _refused(field, f"points at {why} ({host})")
    return parsed


class Body:
    """A fetched answer whose body is not read yet: where it finally came from, and its bytes as they arrive."""

    def __init__(
        self,
        response: httpx.Response,
        url: str,
        *,
        field: str,
        max_bytes: int,
        deadline: float,
        timeout_s: float,
        too_large: type[InvalidInput],
    ) -> None:
        self.url = url
        self.content_type = response.headers.get("content-type")
        self._response = response
        self._field, self._max_bytes, self._too_large = field, max_bytes, too_large
        self._deadline, self._timeout_s = deadline, timeout_s

    def pieces(self) -> Iterator[bytes]:
        """The body as it streams in, refused as soon as it passes the cap or the deadline."""
        field, received = self._field, 0
        try:
            # No chunk size: each network read is seen as it arrives, so a dripping server meets the deadline.
            for piece in self._response.iter_raw():
                received += len(piece)
                if received > self._max_bytes:
                    raise _refused(field, f"is over the limit of {self._max_bytes} bytes", self._too_large)
                if time.monotonic() > self._deadline:
                    raise _refused(field, f"did not finish within {self._timeout_s:g} s")
                yield piece
        except httpx.TimeoutException:
            raise _refused(field, f"did not finish within {self._timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise _refused(field, f"broke off ({type(exc).__name__}: {exc})") from None


@contextmanager
def open_url(
    url: str,
    *,
    field: str,
    allow_hosts: Collection[str] = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
    ssl_context: ssl.SSLContext | None = None,
    accept: str = IMAGE_TYPES,
    too_large: type[InvalidInput] = ValidationFailed,
) -> Iterator[Body]:
    """Open ``url`` under every rule of this module (redirects followed by hand), its body left to stream; raises
    ValidationFailed naming ``field`` (``too_large`` for a body over ``max_bytes``). Blocks: call it off an event
    loop."""
    deadline = time.monotonic() + timeout_s
    current = precheck_url(url, field=field, allow_hosts=allow_hosts)
    headers = {**_HEADERS, "Accept": accept}
    # trust_env=False: no proxy from the environment (a proxy would resolve names itself) and no .netrc.
    with httpx.Client(
        trust_env=False, follow_redirects=False, verify=ssl_context if ssl_context is not None else True
    ) as client:
        for _hop in range(max_redirects + 1):
            address = checked_address(current, field=field, allow_hosts=allow_hosts)
            request = _pinned_request(client, current, address, deadline, field, headers)
            try:
                response = client.send(request, stream=True)
            except httpx.TimeoutException:
                raise _refused(field, f"did not answer within {timeout_s:g} s") from None
            except httpx.HTTPError as exc:
                raise _refused(field, f"could not be fetched ({type(exc).__name__}: {exc})") from None
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise _refused(field, f"answered {response.status_code} without a Location")
                    current = precheck_url(str(current.join(location)), field=field, allow_hosts=allow_hosts)
                    continue
                _check_answer(response, field=field, max_bytes=max_bytes, too_large=too_large)
                yield Body(
                    response,
                    str(current),
                    field=field,
                    max_bytes=max_bytes,
                    deadline=deadline,
                    timeout_s=timeout_s,
                    too_large=too_large,
                )
                return
            finally:
                response.close()
    raise _refused(field, f"redirected more than {max_redirects} times")


def fetch_url(
    url: str,
    *,
    field: str,
    allow_hosts: Collection[str] = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
    ssl_context: ssl.SSLContext | None = None,
) -> Fetched:
    """Download ``url`` (an image) under every rule of this module; raises ValidationFailed naming ``field``."""
    with open_url(
        url,
        field=field,
        allow_hosts=allow_hosts,
        timeout_s=timeout_s,
        max_bytes=max_bytes,
        max_redirects=max_redirects,
        ssl_context=ssl_context,
    ) as body:
        data = bytearray()
        for piece in body.pieces():
            data.extend(piece)
        return Fetched(data=bytes(data), url=body.url, content_type=body.content_type)


def checked_address(url: httpx.URL, *, field: str, allow_hosts: Collection[str]) -> str:
    """Resolve the URL's host once and return the address to connect to, refusing non-public ones (unless the
    host is allow-listed); ValidationFailed naming ``field``. Blocks on DNS: call it off an event loop."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    if _is_ip(host):
        addresses = [host]
    else:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError):
            raise _refused(field, f"names a host that does not resolve ({host})") from None
        if not addresses:
            raise _refused(field, f"names a host that does not resolve ({host})")
    if not host_allowed(host, allow_hosts):
        # Every answer must pass, not just the first: a resolver that mixes in a private address is hostile.
        for address in addresses:
            why = forbidden_reason(address)
            if why is not None:
                raise _refused(field, f"resolves to {why} ({host} -> {address})")
    return addresses[0]


def pinned(url: httpx.URL, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, object]]:
    """What sends a request for ``url`` to the checked ``address``: the URL naming the address, the Host header
    keeping the name, and the request extensions that keep the name for TLS (SNI and the certificate check)."""
    host = url.raw_host.decode("ascii")
    name = f"[{host}]" if ":" in host else host  # an IPv6 literal is bracketed in a Host header
    host_header = name if url.port is None else f"{name}:{url.port}"
    extensions: dict[str, object] = {}
    if url.scheme == "https" and not _is_ip(host):
        # httpcore hands this to the TLS layer as server_hostname: SNI and certificate checks use the name
        # even though the TCP connection goes to the pinned IP.
        extensions["sni_hostname"] = host
    return url.copy_with(host=address.split("%", 1)[0]), {"Host": host_header}, extensions


def _pinned_request(
    client: httpx.Client, url: httpx.URL, address: str, deadline: float, field: str, headers: dict[str, str]
) -> httpx.Request:
    """A GET of ``url`` sent to ``address``, with the name kept in the Host header and TLS SNI."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _refused(field, "took too long (redirects)")
    target, host, extensions = pinned(url, address)
    return client.build_request(
        "GET", target, headers={**headers, **host}, timeout=httpx.Timeout(remaining), extensions=extensions
    )


def _check_answer(response: httpx.Response, *, field: str, max_bytes: int, too_large: type[InvalidInput]) -> None:
    """Refuse an answer whose status, encoding or declared length rules its body out before it is read."""
    if response.status_code != 200:
        raise _refused(field, f"answered HTTP {response.status_code}")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _refused(field, f"answered with a compressed body ({encoding})")
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _refused(field, f"is {declared} bytes; the limit is {max_bytes}", too_large)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _refused(field: str, message: str, cls: type[InvalidInput] = ValidationFailed) -> InvalidInput:
    return cls(f"{field} {message}", [{"field": field, "message": f"the URL {message}"}])
