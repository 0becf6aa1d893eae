"""The live-browsing guard (corpora/web.py, corpora/netguard.py) against real loopback servers.

A page server on 127.0.0.1 is reachable only through the explicit ``test_only_allow`` entry for
its exact ip:port. A canary server on 127.0.0.1 counts every TCP connection it accepts: every
refused form is aimed at it and it must see none. ``open_socket`` (the one place the fetcher
connects) is wrapped too, so refusals are shown to happen before any connection is attempted.
"""
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from corpora import web
from corpora.netguard import address_problem, parse_numeric_ipv4
from corpora.web import WebFetcher, WebFetchError, WebRefused, looks_like_url

PAGE = (b"<html><head><title>Test Page</title><style>p{}</style></head><body><nav>menu menu</nav>"
        b"<header>site banner</header><main><h1>Test Page</h1><p>Alpha beta gamma.</p><p>Second para.</p></main>"
        b"<aside>sidebar</aside><script>var x = 1;</script><footer>copyright</footer></body></html>")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.connections = 0
        self.requests: list[tuple[str, dict]] = []
        self.port = self.server_address[1]

    def verify_request(self, request, client_address):
        self.connections += 1  # every accepted TCP connection, before any bytes are read
        return True


class _Handler(BaseHTTPRequestHandler):
    routes: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.path, dict(self.headers)))
        route = self.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_error(404)
            return
        route(self)


def _send(h, body: bytes, ctype="text/html; charset=utf-8", status=200, length=True, extra=()):
    h.send_response(status)
    if ctype:
        h.send_header("Content-Type", ctype)
    if length:
        h.send_header("Content-Length", str(len(body)))
    for k, v in extra:
        h.send_header(k, v)
    h.send_header("Connection", "close")
    h.end_headers()
    try:
        h.wfile.write(body)
    except OSError:  # the fetcher hung up (a refused size)
        pass


def _serve(routes):
    handler = type("H", (_Handler,), {"routes": routes})
    srv = _Server(handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return srv


@pytest.fixture
def canary():
    srv = _serve({"/": lambda h: _send(h, b"<title>canary</title><p>secret</p>")})
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def site(canary):
    def redirect_to(loc):
        return lambda h: _send(h, b"", status=302, extra=[("Location", loc)])

    def drip(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.end_headers()
        try:
            for _ in range(40):
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def unbounded(h):  # no Content-Length: the body ends when the connection closes
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Connection", "close")
        h.end_headers()
        try:
            for _ in range(300):
                h.wfile.write(b"y" * 10_000)
        except OSError:
            pass

    c = canary.port
    routes = {
        "/page": lambda h: _send(h, PAGE),
        "/plain": lambda h: _send(h, "héllo plain wörld".encode("latin-1"), ctype="text/plain; charset=latin-1"),
        "/xhtml": lambda h: _send(h, b"<html><title>X</title><body><p>xhtml body</p></body></html>", ctype="application/xhtml+xml"),
        "/png": lambda h: _send(h, b"\x89PNG....", ctype="image/png"),
        "/json": lambda h: _send(h, b"{}", ctype="application/json"),
        "/notype": lambda h: _send(h, b"<p>x</p>", ctype=None),
        "/gzip": lambda h: _send(h, b"\x1f\x8b...", extra=[("Content-Encoding", "gzip")]),
        "/big": lambda h: _send(h, b"<p>" + b"w " * 600_000 + b"</p>"),
        "/unbounded": unbounded,
        "/drip": drip,
        "/missing": lambda h: h.send_error(404),
        "/to-page": redirect_to("/page"),
        "/to-canary": redirect_to(f"http://127.0.0.1:{c}/"),
        "/to-localhost": redirect_to(f"http://localhost:{c}/"),
        "/to-decimal": redirect_to(f"http://2130706433:{c}/"),
        "/to-v6": redirect_to(f"http://[::ffff:127.0.0.1]:{c}/"),
        "/to-metadata": redirect_to("http://169.254.169.254/latest/meta-data/"),
        "/to-private": redirect_to("http://10.0.0.1/"),
        "/to-file": redirect_to("file:///etc/passwd"),
        "/loop": redirect_to("/loop"),
    }
    srv = _serve(routes)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def connects(monkeypatch):
    """Every address the fetcher opens a socket to."""
    seen = []
    real = web.open_socket

    def spy(address, timeout):
        seen.append(address)
        return real(address, timeout)

    monkeypatch.setattr(web, "open_socket", spy)
    return seen


def _fetcher(site, **kw):
    return WebFetcher(test_only_allow=[f"127.0.0.1:{site.port}"], **kw)


def test_reads_a_real_page_main_text_only(site, connects):
    page = _fetcher(site).fetch(f"http://127.0.0.1:{site.port}/page")
    assert page.title == "Test Page" and page.final_url == f"http://127.0.0.1:{site.port}/page"
    assert "Alpha beta gamma." in page.text and "Second para." in page.text
    for chrome in ("menu", "banner", "sidebar", "var x", "copyright", "p{}"):
        assert chrome not in page.text
    assert connects == [("127.0.0.1", site.port)]
    path, headers = site.requests[-1]
    assert path == "/page" and headers["Host"] == f"127.0.0.1:{site.port}" and headers["Accept-Encoding"] == "identity"


def test_plain_text_and_xhtml_with_charsets(site):
    f = _fetcher(site)
    plain = f.fetch(f"http://127.0.0.1:{site.port}/plain")
    assert plain.text == "héllo plain wörld" and plain.title == "plain"
    assert "xhtml body" in f.fetch(f"http://127.0.0.1:{site.port}/xhtml").text
    assert web.fetch(f"http://127.0.0.1:{site.port}/page", test_only_allow=[f"127.0.0.1:{site.port}"]).title == "Test Page"


LOOPBACK_FORMS = [
    "http://localhost:{c}/",
    "http://LOCALHOST.:{c}/",
    "http://127.0.0.1:{c}/",
    "http://127.1:{c}/",
    "http://127.0.1:{c}/",
    "http://2130706433:{c}/",
    "http://0x7f000001:{c}/",
    "http://0x7f.0.0.1:{c}/",
    "http://0177.0.0.1:{c}/",
    "http://0177.1:{c}/",
    "http://[::1]:{c}/",
    "http://[::ffff:127.0.0.1]:{c}/",
    "http://[::ffff:7f00:1]:{c}/",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{c}/",
    "http://0.0.0.0:{c}/",
    "http://0:{c}/",
    "http://[::]:{c}/",
    "https://127.0.0.1:{c}/",
]
OTHER_FORMS = [
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[fe80::1]/",
    "http://[fec0::1]/",
    "http://[ff02::1]/",
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://[2002:c0a8:101::1]/",  # 6to4 of 192.168.1.1
    "http://[::ffff:10.0.0.1]/",
]
SCHEME_AND_CREDENTIAL_FORMS = [
    "file:///etc/passwd",
    "ftp://127.0.0.1:{c}/",
    "gopher://127.0.0.1:{c}/",
    "http://user:pass@127.0.0.1:{c}/",
    "http://user@127.0.0.1:{c}/",
    "http://user:pass@example.com/",
    "http:///nohost",
    "http://127.0.0.1:99999/",
    "http://127.0.0.1:0/",
]


@pytest.mark.parametrize("form", LOOPBACK_FORMS + OTHER_FORMS + SCHEME_AND_CREDENTIAL_FORMS)
def test_refused_forms_open_no_connection(form, canary, connects):
    url = form.format(c=canary.port)
    with pytest.raises(WebRefused) as err:
        WebFetcher().fetch(url)  # the test allowance is off
    assert str(err.value)
    assert connects == [] and canary.connections == 0


def test_test_allowance_is_exact_ip_and_port(site, canary, connects):
    f = _fetcher(site)
    for url in (f"http://127.0.0.1:{canary.port}/", f"http://[::ffff:127.0.0.1]:{site.port}/page",
                f"http://127.0.0.2:{site.port}/page", f"http://[::1]:{site.port}/page"):
        with pytest.raises(WebRefused):
            f.fetch(url)
    assert connects == [] and canary.connections == 0
    assert f.fetch(f"http://127.1:{site.port}/page").title == "Test Page"  # same address, other spelling


@pytest.mark.parametrize("route", ["/to-canary", "/to-localhost", "/to-decimal", "/to-v6", "/to-metadata", "/to-private",
                                   "/to-file"])
def test_redirect_to_a_forbidden_address_is_refused(route, site, canary, connects):
    with pytest.raises(WebRefused):
        _fetcher(site).fetch(f"http://127.0.0.1:{site.port}{route}")
    assert connects == [("127.0.0.1", site.port)]  # only the first hop was opened
    assert canary.connections == 0


def test_redirects_are_followed_and_capped(site):
    f = _fetcher(site)
    page = f.fetch(f"http://127.0.0.1:{site.port}/to-page")
    assert page.title == "Test Page" and page.final_url.endswith("/page")
    with pytest.raises(WebRefused, match="more than 5 redirects"):
        f.fetch(f"http://127.0.0.1:{site.port}/loop")
    assert sum(p == "/loop" for p, _ in site.requests) == 6  # the first request and 5 hops
    with pytest.raises(WebRefused, match="more than 0 redirects"):
        _fetcher(site, max_redirects=0).fetch(f"http://127.0.0.1:{site.port}/to-page")


@pytest.mark.parametrize("route, reason", [
    ("/png", "content type 'image/png'"),
    ("/json", "content type 'application/json'"),
    ("/notype", "content type 'missing'"),
    ("/gzip", "compressed"),
    ("/big", "larger than 1,000,000 bytes"),  # refused on its Content-Length
    ("/unbounded", "larger than 1,000,000 bytes"),  # no length: stopped while streaming
])
def test_content_type_encoding_and_size_are_refused(route, reason, site):
    with pytest.raises(WebRefused, match=reason):
        _fetcher(site, max_bytes=1_000_000).fetch(f"http://127.0.0.1:{site.port}{route}")


def test_total_time_cap_stops_a_slow_drip(site):
    t0 = time.monotonic()
    with pytest.raises(WebFetchError, match="longer than 0.5 s"):
        _fetcher(site, timeout=0.5).fetch(f"http://127.0.0.1:{site.port}/drip")
    assert time.monotonic() - t0 < 2.0  # the drip would take 4 s


def test_http_errors_and_unresolvable_hosts_are_fetch_errors(site, monkeypatch):
    with pytest.raises(WebFetchError, match="HTTP 404") as err:
        _fetcher(site).fetch(f"http://127.0.0.1:{site.port}/missing")
    assert not isinstance(err.value, WebRefused)

    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)  # no DNS query leaves the machine
    with pytest.raises(WebFetchError, match="cannot resolve"):
        _fetcher(site).fetch("http://no-such-host.invalid/")


def test_allowlist_refuses_other_hosts_before_resolving(site, monkeypatch):
    looked_up = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: looked_up.append(a[0]) or real(*a, **k))
    f = _fetcher(site, allow_hosts=["127.0.0.1"])
    assert f.fetch(f"http://127.0.0.1:{site.port}/page").title == "Test Page"
    for url in ("http://example.com/", f"http://127.1:{site.port}/page", "http://evil.127.0.0.1.nip.io/"):
        with pytest.raises(WebRefused, match="not in the allowlist"):
            f.fetch(url)
    assert looked_up == ["127.0.0.1"]
    assert WebFetcher(allow_hosts=["Example.COM."]).allow_hosts == {"example.com"}


def test_dns_rebinding_uses_the_first_checked_address(monkeypatch, connects):
    """The resolver answers a public address, then (rebinding) loopback: the connection goes to
    the public address that was checked, and the second answer is never asked for."""
    answers = [ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("127.0.0.1")]
    calls = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        ip = answers[min(len(calls) - 1, 1)]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (str(ip), port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)

    def no_network(address, timeout):
        connects.append(address)
        raise ConnectionRefusedError("no network in tests")

    monkeypatch.setattr(web, "open_socket", no_network)
    with pytest.raises(WebFetchError, match="cannot connect"):
        WebFetcher().fetch("http://rebind.example/")
    assert calls == ["rebind.example"] and connects == [("93.184.215.14", 80)]


def test_dns_rebinding_against_a_real_server(site, canary, monkeypatch):
    """The host name resolves to the allowed test server once; every later answer would point
    elsewhere. The page is read from the pinned address with the original Host header."""
    calls = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        ip = "127.0.0.1" if len(calls) == 1 else "10.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    page = _fetcher(site).fetch(f"http://rebind.example:{site.port}/page")
    assert page.title == "Test Page" and page.final_url == f"http://rebind.example:{site.port}/page"
    assert calls == ["rebind.example"]
    assert site.requests[-1][1]["Host"] == f"rebind.example:{site.port}"


def test_any_bad_address_among_several_refuses(monkeypatch, connects):
    def two_answers(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", two_answers)
    with pytest.raises(WebRefused, match="loopback"):
        WebFetcher().fetch("http://mixed.example/")
    assert connects == []


def test_numeric_hosts_are_checked_even_if_the_resolver_disagrees(monkeypatch, connects):
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, port, *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))])
    for host in ("2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1", "10.1"):
        with pytest.raises(WebRefused):
            WebFetcher().fetch(f"http://{host}/")
    assert connects == []


def test_helpers():
    assert parse_numeric_ipv4("127.1") == ipaddress.ip_address("127.0.0.1")
    assert parse_numeric_ipv4("0x7f.0.0.1") == parse_numeric_ipv4("0177.0.0.1") == parse_numeric_ipv4("2130706433")
    assert parse_numeric_ipv4("example.com") is None and parse_numeric_ipv4("1.2.3.4.5") is None
    assert parse_numeric_ipv4("256.1.1.1") is None and parse_numeric_ipv4("08.0.0.1") is None
    assert address_problem(ipaddress.ip_address("93.184.215.14")) is None
    assert address_problem(ipaddress.ip_address("2606:4700:4700::1111")) is None
    assert "CGNAT" in address_problem(ipaddress.ip_address("100.64.0.1"))
    assert looks_like_url("https://x.org/a") and looks_like_url("file:///etc/passwd") and looks_like_url("ftp://h/")
    assert not looks_like_url("Ed Wood") and not looks_like_url("Star Wars: Episode I")
    with pytest.raises(ValueError):
        WebFetcher(test_only_allow=["127.0.0.1"])
    with pytest.raises(ValueError):
        WebFetcher(max_bytes=0)


@pytest.fixture
def tls_site(tmp_path, monkeypatch):
    """An HTTPS page server on 127.0.0.1 whose self-signed certificate names only pinned.example;
    the fetcher's TLS context trusts that certificate, and the server records the SNI it gets."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=pinned.example",
                    "-addext", "subjectAltName=DNS:pinned.example"], check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    names = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)
    srv = _serve({"/page": lambda h: _send(h, PAGE)})
    srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True)
    srv.sni = names
    real_default = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: real_default(cafile=str(cert)))
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, port, *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))])
    yield srv
    srv.shutdown()
    srv.server_close()


def test_https_is_pinned_with_the_original_name_for_sni_and_the_certificate(tls_site, connects):
    f = WebFetcher(test_only_allow=[f"127.0.0.1:{tls_site.port}"])
    page = f.fetch(f"https://pinned.example:{tls_site.port}/page")
    assert page.title == "Test Page" and page.final_url == f"https://pinned.example:{tls_site.port}/page"
    assert connects == [("127.0.0.1", tls_site.port)] and tls_site.sni == ["pinned.example"]
    assert tls_site.requests[-1][1]["Host"] == f"pinned.example:{tls_site.port}"
    with pytest.raises(WebFetchError, match="cannot connect"):  # the certificate does not name 127.0.0.1
        f.fetch(f"https://127.0.0.1:{tls_site.port}/page")
