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
  ``127.1``) are also parsed as ``inet_aton`` does and checked, whatever the resolver says.
  (These address and URL rules are ``corpora/netguard.py``; this module connects and fetches.)
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
import socket
import ssl
import threading
import time
from typing import NamedTuple, Sequence
from urllib.parse import urljoin

from corpora.htmlpages import html_to_page
from corpora.netguard import Target, WebFetchError, WebRefused, ascii_host, check_url, ip_address, ip_port

DEFAULT_MAX_BYTES = 2_000_000
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_REDIRECTS = 5
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
HTML_TYPES = ("text/html", "application/xhtml+xml")
REDIRECT_CODES = (301, 302, 303, 307, 308)
# Dropped with their content: code, page chrome (menus, banners, sidebars, footers), embeds.
WEB_DROP_TAGS = ("script", "style", "noscript", "template", "nav", "header", "footer", "aside", "svg", "iframe",
                 "form", "head")
USER_AGENT = "webqa-gym (live browsing for a QA agent)"


class WebPage(NamedTuple):
    final_url: str
    title: str
    text: str


def looks_like_url(s: str) -> bool:
    """``scheme://...``: what the env sends to the web (``file://`` and ``ftp://`` too, to be refused)."""
    head, sep, _ = s.strip().partition("://")
    return bool(sep) and head[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in head)


def open_socket(address: tuple[str, int], timeout: float) -> socket.socket:
    """The one place a connection is opened (tests spy on it): a TCP socket to a checked IP
    literal, connected directly (``socket.create_connection`` would resolve it again)."""
    family = socket.AF_INET6 if ip_address(address[0]).version == 6 else socket.AF_INET
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
        self.allow_hosts = None if allow_hosts is None else frozenset(ascii_host(h) for h in allow_hosts)
        self.max_bytes, self.timeout, self.max_redirects = int(max_bytes), float(timeout), int(max_redirects)
        self.content_types = tuple(t.lower() for t in content_types)
        self.test_only_allow = frozenset(ip_port(a) for a in test_only_allow)

    # -- the guard (corpora/netguard.py) ------------------------------------------------------
    def check(self, url: str) -> Target:
        """Refuse ``url`` (:class:`WebRefused`) or return where to connect: checked addresses."""
        return check_url(url, self.allow_hosts, self.test_only_allow)

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

    def _get(self, t: Target, deadline: float) -> _Body | str:
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

    def _exchange(self, conn: http.client.HTTPConnection, t: Target, deadline: float) -> _Body | str:
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


def _to_page(body: _Body, t: Target) -> WebPage:
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


def _charset(params: str) -> str | None:
    for p in params.split(";"):
        k, _, v = p.partition("=")
        if k.strip().lower() == "charset" and v.strip().strip('"\''):
            return v.strip().strip('"\'')
    return None


def _display_url(t: Target) -> str:
    host = f"[{t.host}]" if ":" in t.host else t.host
    default = 443 if t.scheme == "https" else 80
    return f"{t.scheme}://{host}{'' if t.port == default else f':{t.port}'}{t.target}"


def _fallback_title(t: Target) -> str:
    last = t.target.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return last or t.host
