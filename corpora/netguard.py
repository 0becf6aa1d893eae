"""The address and URL rules of live browsing: the SSRF guard that ``corpora/web.py`` applies to
every request and redirect hop (the rules themselves are listed in that module's docstring).

    check_url(url, allow_hosts, test_only_allow) -> Target(scheme, host, port, target, addresses)

raises ``WebRefused`` when a rule says no and ``WebFetchError`` when the host cannot be resolved.
Numeric hosts are parsed as ``inet_aton`` does (``parse_numeric_ipv4``) and every resolved address
is judged by ``address_problem``, IPv4 embedded in IPv6 included. Pure ``ipaddress`` and one
``socket.getaddrinfo`` per check; no connection is opened here.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Collection, NamedTuple
from urllib.parse import quote, urlsplit

CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class WebFetchError(Exception):
    """The page could not be fetched; the message is the reason."""


class WebRefused(WebFetchError):
    """A guard rule refused the URL (or its content); the message is the reason."""


class Target(NamedTuple):
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, no brackets
    port: int
    target: str  # path?query sent in the request line
    addresses: list[str]  # resolved and checked, in resolver order


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


def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)


def check_url(url: str, allow_hosts: Collection[str] | None, test_only_allow: Collection[tuple] = ()) -> Target:
    """Refuse ``url`` (:class:`WebRefused`) or return where to connect: checked addresses.
    ``allow_hosts``: ASCII host names (None: any public host); ``test_only_allow``: exact
    ``(ip, port)`` pairs the address rules let through (tests only)."""
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
        host = ascii_host(parts.hostname)
    except ValueError:
        raise WebRefused("the host name is not valid") from None
    if port == 0:
        raise WebRefused("port 0 cannot be browsed")
    port = port or (443 if scheme == "https" else 80)
    if allow_hosts is not None and host not in allow_hosts:
        raise WebRefused(f"host {host!r} is not in the allowlist")
    addresses = resolve(host, port, test_only_allow)
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return Target(scheme, host, port, target, addresses)


def resolve(host: str, port: int, test_only_allow: Collection[tuple] = ()) -> list[str]:
    """The addresses of ``host``, each one checked (a numeric host also as ``inet_aton`` reads it)."""
    numeric = parse_numeric_ipv4(host)
    if numeric is not None:
        check_address(numeric, port, test_only_allow)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise WebFetchError(f"cannot resolve host {host!r} ({e})") from None
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise WebRefused("the host resolves to a non-IP address")
        try:
            ip = ip_address(sockaddr[0])
        except ValueError:
            raise WebRefused("the host resolves to an unreadable address") from None
        check_address(ip, port, test_only_allow)
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    if not addresses:
        raise WebFetchError(f"cannot resolve host {host!r}")
    return addresses


def check_address(ip, port: int, test_only_allow: Collection[tuple] = ()) -> None:
    """Refuse a non-public ``ip`` unless ``(ip, port)`` is in ``test_only_allow``."""
    if (ip, port) in test_only_allow:
        return
    problem = address_problem(ip)
    if problem:  # the address itself is not echoed: it could leak internal DNS
        raise WebRefused(f"the host is {problem}, which may not be browsed")


def ascii_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("empty host")
    if ":" in host:  # an IPv6 literal
        return str(ip_address(host))
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise ValueError(str(e)) from None


def ip_port(spec: str) -> tuple:
    """``"127.0.0.1:8000"`` or ``"[::1]:8000"`` -> (address, port), exact."""
    host, sep, port = spec.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"test_only_allow entries are 'ip:port', got {spec!r}")
    return ip_address(host.strip("[]")), int(port)
