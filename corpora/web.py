"""Live web pages for browsing, fetched through a guard that cannot be turned against the host.

    WebFetcher(allow_hosts=("en.wikipedia.org",)).fetch("https://en.wikipedia.org/wiki/Ed_Wood")
    -> WebPage(final_url, title, text)           # or raises WebRefused / WebFetchError

Opt-in: only ``gym.make("WebQA-v0", pages="web")`` (``WebQA-Web-v0``) browses the live web.
An agent's URL is untrusted input, so every request goes through these rules (SSRF guard):

* ``http``/``https`` only; no credentials (``user:pass@``) in the URL; an optional host
  allowlist (exact host names, checked before any DNS lookup).
* The host is resolved once with ``socket.getaddrinfo`` and *every* address it gives is checked
  with ``ipaddress``: loopback, private, link-local, shared/CGNAT (100.64.0.0/10), multicast,
  reserved, unspecified, broadcast, IPv6 unique-local and site-local, and IPv6 forms that embed
  an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible, NAT64 ``64:ff9b::/96``, 6to4
  ``2002::/16``, Teredo ``2001::/32``) judged by the IPv4 inside. One bad address refuses the
  URL. Numeric hosts in any spelling (``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``,
  ``127.1``) are also parsed here as ``inet_aton`` does and checked, whatever the resolver says.
* The connection goes to the checked address itself (the host name is only sent as ``Host`` and
  as TLS SNI / certificate name), so a second DNS answer (rebinding) is never used.
* Redirects are followed by hand, at most ``max_redirects``, each hop checked like the first.
* Caps: ``max_bytes`` of body (streamed, stopped at the cap), ``timeout`` seconds for the whole
  fetch, redirects included (a timer closes the socket, so a slow drip cannot stretch it),
  content types ``text/html``, ``application/xhtml+xml``, ``text/plain`` only, no compressed
  bodies (``Accept-Encoding: identity``).

``WebRefused`` (a rule said no) and ``WebFetchError`` (the fetch itself failed: DNS, connection,
HTTP status, time) carry the reason as their message; ``WebRefused`` is a ``WebFetchError``.

``test_only_allow`` is for tests only: exact ``"ip:port"`` addresses (e.g. a ``http.server`` on
``127.0.0.1``) that the address rules let through. It is a constructor argument, never read from
the environment, and admits nothing but those exact address and port pairs.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from typing import NamedTuple, Sequence
from urllib.parse import quote, urljoin, urlsplit

from corpora.htmlpages import html_to_page

DEFAULT_MAX_BYTES = 2_000_000
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_REDIRECTS = 5
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
HTML_TYPES = ("text/html", "application/xhtml+xml")
REDIRECT_CODES = (301, 302, 303, 307, 308)
# Dropped with their content: code, page chrome (menus, banners, sidebars, footers), embeds.
WEB_DROP_TAGS = ("script", "style", "noscript", "template", "nav", "header", "footer", "aside", "svg", "iframe",
                 "form", "head")
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
USER_AGENT = "webqa-gym (live browsing for a QA agent)"


class WebFetchError(Exception):
    """The page could not be fetched; the message is the reason."""


class WebRefused(WebFetchError):
    """A guard rule refused the URL (or its content); the message is the reason."""


class WebPage(NamedTuple):
    final_url: str
    title: str
    text: str


class _Target(NamedTuple):
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, no brackets
    port: int
    target: str  # path?query sent in the request line
    addresses: list[str]  # resolved and checked, in resolver order


def looks_like_url(s: str) -> bool:
    """``scheme://...``: what the env sends to the web (``file://`` and ``ftp://`` too, to be refused)."""
    head, sep, _ = s.strip().partition("://")
    return bool(sep) and head[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in head)


def parse_numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address an ``inet_aton``-style numeric host means (``127.1``, ``2130706433``,
    ``0x7f.0.0.1``, ``0177.0.0.1``), or None if ``host`` is not one."""
    parts = host.split(".")
    if host.endswith("."):
        parts = parts[:-1]
    if not 1 <= len(parts) <= 4:
        return None
    nums = []
    for p in parts:
        try:
            if p[:2].lower() == "0x":
                nums.append(int(p[2:] or "0", 16))
            elif len(p) > 1 and p[0] == "0":
                nums.append(int(p, 8))
            elif p.isdigit():
                nums.append(int(p))
            else:
                return None
        except ValueError:
            return None
    last_bits = 32 - 8 * (len(nums) - 1)
    if any(n > 255 for n in nums[:-1]) or nums[-1] >= 1 << last_bits:
        return None
    value = 0
    for n in nums[:-1]:
        value = value << 8 | n
    return ipaddress.IPv4Address(value << last_bits | nums[-1])


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why connecting to ``ip`` is not allowed, or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = []
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        if ip in NAT64 or (ip in IPV4_COMPATIBLE and int(ip) > 1):
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        for v4 in embedded:
            problem = address_problem(v4)
            if problem:
                return f"an IPv6 address that embeds {problem}"
        if ip.is_site_local:
            return "a site-local address"
    checks = [
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    ]
    for attr, reason in checks:
        if getattr(ip, attr):
            return reason
    if ip.version == 4 and ip in CGNAT:
        return "a shared (CGNAT) address"
    if not ip.is_global:
        return "a non-public address"
    return None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)


def open_socket(address: tuple[str, int], timeout: float) -> socket.socket:
    """The one place a connection is opened (tests spy on it): a TCP socket to a checked IP
    literal, connected directly (``socket.create_connection`` would resolve it again)."""
    family = socket.AF_INET6 if _ip(address[0]).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to ``host`` (sent as ``Host``) over a socket to the checked address ``ip``."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.pinned_ip, self.raw_sock = ip, None

    def connect(self) -> None:
        self.sock = self.raw_sock = open_socket((self.pinned_ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to ``host`` (``Host``, SNI and the certificate's name) over a socket to ``ip``."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.pinned_ip, self.raw_sock = ip, None

    def connect(self) -> None:
        self.raw_sock = open_socket((self.pinned_ip, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(self.raw_sock, server_hostname=self.host)


class WebFetcher:
    """The guard's settings; :meth:`fetch` applies them. Holds no connection (pickles)."""

    def __init__(
        self,
        allow_hosts: Sequence[str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float = DEFAULT_TIMEOUT,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        content_types: Sequence[str] = TEXT_TYPES,
        test_only_allow: Sequence[str] = (),
    ):
        if isinstance(allow_hosts, str):
            allow_hosts = [allow_hosts]
        if max_bytes < 1 or timeout <= 0 or max_redirects < 0:
            raise ValueError("max_bytes and timeout must be > 0 and max_redirects >= 0")
        if isinstance(test_only_allow, str):
            test_only_allow = [test_only_allow]
        self.allow_hosts = None if allow_hosts is None else frozenset(_ascii_host(h) for h in allow_hosts)
        self.max_bytes, self.timeout, self.max_redirects = int(max_bytes), float(timeout), int(max_redirects)
        self.content_types = tuple(t.lower() for t in content_types)
        self.test_only_allow = frozenset(_ip_port(a) for a in test_only_allow)

    # -- the guard ------------------------------------------------------------------------------
    def check(self, url: str) -> _Target:
        """Refuse ``url`` (:class:`WebRefused`) or return where to connect: checked addresses."""
        url = url.strip()
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise WebRefused(f"malformed URL ({e})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise WebRefused(f"only http and https URLs can be browsed, not {scheme or 'no scheme'!r}")
        if "@" in parts.netloc or parts.username is not None or parts.password is not None:
            raise WebRefused("URLs with credentials (user:password@) are not allowed")
        if not parts.hostname:
            raise WebRefused("the URL has no host")
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
            raise WebRefused("the URL contains spaces or control characters")
        try:
            host = _ascii_host(parts.hostname)
        except ValueError:
            raise WebRefused("the host name is not valid") from None
        if port == 0:
            raise WebRefused("port 0 cannot be browsed")
        port = port or (443 if scheme == "https" else 80)
        if self.allow_hosts is not None and host not in self.allow_hosts:
            raise WebRefused(f"host {host!r} is not in the allowlist")
        addresses = self._resolve(host, port)
        target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
        return _Target(scheme, host, port, target, addresses)

    def _resolve(self, host: str, port: int) -> list[str]:
        numeric = parse_numeric_ipv4(host)
        if numeric is not None:
            self._check_address(numeric, port)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise WebFetchError(f"cannot resolve host {host!r} ({e})") from None
        addresses: list[str] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                raise WebRefused("the host resolves to a non-IP address")
            try:
                ip = _ip(sockaddr[0])
            except ValueError:
                raise WebRefused("the host resolves to an unreadable address") from None
            self._check_address(ip, port)
            if sockaddr[0] not in addresses:
                addresses.append(sockaddr[0])
        if not addresses:
            raise WebFetchError(f"cannot resolve host {host!r}")
        return addresses

    def _check_address(self, ip, port: int) -> None:
        if (ip, port) in self.test_only_allow:
            return
        problem = address_problem(ip)
        if problem:  # the address itself is not echoed: it could leak internal DNS
            raise WebRefused(f"the host is {problem}, which may not be browsed")

    # -- fetching -------------------------------------------------------------------------------
    def fetch(self, url: str) -> WebPage:
        """Fetch ``url`` under every rule: (final URL, title, main text); raises WebFetchError."""
        deadline = time.monotonic() + self.timeout
        for _ in range(self.max_redirects + 1):
            target = self.check(url)
            got = self._get(target, deadline)
            if isinstance(got, _Body):
                return _to_page(got, target)
            url = urljoin(url, got)
        raise WebRefused(f"more than {self.max_redirects} redirects")

    def _get(self, t: _Target, deadline: float) -> _Body | str:
        """One request to the checked addresses of ``t``: the body, or a redirect's Location."""
        last_error: Exception | None = None
        for ip in t.addresses:  # all checked; the next one only if connecting fails
            left = deadline - time.monotonic()
            if left <= 0:
                break
            cls = _PinnedHTTPS if t.scheme == "https" else _PinnedHTTP
            conn = cls(t.host, t.port, ip, timeout=left)
            expired = threading.Event()

            def stop(conn=conn, expired=expired):  # conn.sock is None once a response owns it
                expired.set()
                if conn.raw_sock is not None:
                    try:
                        conn.raw_sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            timer = threading.Timer(left, stop)
            timer.daemon = True
            timer.start()
            try:
                try:
                    conn.connect()
                except OSError as e:
                    if expired.is_set():
                        break
                    last_error = e
                    continue
                try:
                    result = self._exchange(conn, t, deadline)
                except (OSError, http.client.HTTPException) as e:
                    if expired.is_set():
                        break
                    raise WebFetchError(f"the fetch failed ({type(e).__name__}: {e})") from None
                if expired.is_set() or time.monotonic() > deadline:  # what was read may be cut short
                    break
                return result
            finally:
                timer.cancel()
                conn.close()
                if conn.raw_sock is not None:
                    conn.raw_sock.close()
        if last_error is None or time.monotonic() >= deadline:
            raise WebFetchError(f"the fetch took longer than {self.timeout:g} s")
        raise WebFetchError(f"cannot connect to {t.host!r} ({last_error})")

    def _exchange(self, conn: http.client.HTTPConnection, t: _Target, deadline: float) -> _Body | str:
        conn.putrequest("GET", t.target, skip_accept_encoding=True)
        conn.putheader("Accept", "text/html, application/xhtml+xml, text/plain;q=0.9")
        conn.putheader("Accept-Encoding", "identity")
        conn.putheader("User-Agent", USER_AGENT)
        conn.putheader("Connection", "close")
        conn.endheaders()
        resp = conn.getresponse()
        try:
            if resp.status in REDIRECT_CODES:
                location = resp.getheader("Location")
                if not location:
                    raise WebFetchError(f"HTTP {resp.status} redirect without a Location")
                return location.strip()
            if not 200 <= resp.status < 300:
                raise WebFetchError(f"HTTP {resp.status} {resp.reason}".strip())
            media, _, params = (resp.getheader("Content-Type") or "").partition(";")
            media = media.strip().lower()
            if media not in self.content_types:
                raise WebRefused(f"content type {media or 'missing'!r} is not one of {', '.join(self.content_types)}")
            encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
            if encoding != "identity":
                raise WebRefused(f"compressed bodies ({encoding}) are not accepted")
            length = resp.getheader("Content-Length")
            if length and length.strip().isdigit() and int(length) > self.max_bytes:
                raise WebRefused(f"the page is larger than {self.max_bytes:,} bytes")
            chunks, size = [], 0
            while time.monotonic() <= deadline:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise WebRefused(f"the page is larger than {self.max_bytes:,} bytes")
                chunks.append(chunk)
            return _Body(media, _charset(params), b"".join(chunks))
        finally:
            resp.close()


class _Body(NamedTuple):
    media: str
    charset: str | None
    data: bytes


def _to_page(body: _Body, t: _Target) -> WebPage:
    """Main text and title of a fetched body (after the connection is closed)."""
    if body.media in HTML_TYPES:
        markup: str | bytes = body.data
        if body.charset:
            try:
                markup = body.data.decode(body.charset, errors="replace")
            except LookupError:
                pass
        try:
            title, text = html_to_page(markup, fallback_title=_fallback_title(t), drop_tags=WEB_DROP_TAGS)
        except Exception as e:  # hostile markup must not crash an episode
            raise WebFetchError(f"the page could not be parsed ({type(e).__name__})") from None
    else:
        try:
            text = body.data.decode(body.charset or "utf-8", errors="replace")
        except LookupError:
            text = body.data.decode("utf-8", errors="replace")
        title = _fallback_title(t)
    return WebPage(_display_url(t), title, text)


def fetch(url: str, **guard_options) -> WebPage:
    """One guarded fetch: ``WebFetcher(**guard_options).fetch(url)``."""
    return WebFetcher(**guard_options).fetch(url)


def _ascii_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("empty host")
    if ":" in host:  # an IPv6 literal
        return str(_ip(host))
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise ValueError(str(e)) from None


def _ip_port(spec: str) -> tuple:
    """``"127.0.0.1:8000"`` or ``"[::1]:8000"`` -> (address, port), exact."""
    host, sep, port = spec.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"test_only_allow entries are 'ip:port', got {spec!r}")
    return _ip(host.strip("[]")), int(port)


def _charset(params: str) -> str | None:
    for p in params.split(";"):
        k, _, v = p.partition("=")
        if k.strip().lower() == "charset" and v.strip().strip('"\''):
            return v.strip().strip('"\'')
    return None


def _display_url(t: _Target) -> str:
    host = f"[{t.host}]" if ":" in t.host else t.host
    default = 443 if t.scheme == "https" else 80
    return f"{t.scheme}://{host}{'' if t.port == default else f':{t.port}'}{t.target}"


def _fallback_title(t: _Target) -> str:
    last = t.target.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return last or t.host
