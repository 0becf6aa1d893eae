"""WebQA-v0 with pages="web" (WebQA-Web-v0): live pages from a real loopback http.server,
reachable only through the explicit test allowance, windowed like stored pages."""
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers the ids)

WORDS = " ".join(f"w{i}" for i in range(250))
LONG = f"<html><head><title>Long Page</title></head><body><nav>menu</nav><p>{WORDS}</p></body></html>".encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, pages):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.pages, self.paths, self.connections = pages, [], 0
        self.port = self.server_address[1]

    def verify_request(self, request, client_address):
        self.connections += 1
        return True


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.paths.append(self.path)
        body = self.server.pages.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _start(pages):
    srv = _Server(pages)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return srv


@pytest.fixture
def servers():
    site, canary = _start({"/long": LONG}), _start({"/": b"<title>canary</title>"})
    yield site, canary
    for s in (site, canary):
        s.shutdown()
        s.server_close()


def _env(site, **kw):
    kw.setdefault("browse_words", 100)
    kw.setdefault("max_turns", 10)
    return gym.make("WebQA-Web-v0", web_test_only_allow=[f"127.0.0.1:{site.port}"], **kw).unwrapped


def test_a_live_page_is_windowed_like_a_stored_page(servers):
    site, _ = servers
    env = _env(site)
    env.reset(seed=0)
    url = f"http://127.0.0.1:{site.port}/long"
    o1, r, term, trunc, info = env.step(f"<browse>{url}</browse>")
    assert "Page: Long Page (part 1 of 3)" in o1 and "w0 w1" in o1 and "w99" in o1 and "w100 " not in o1
    assert "menu" not in o1 and f"[To read on: <browse>{url}#2</browse>]" in o1
    assert o1.startswith("\n\n<information>") and not (term or trunc) and r == 0.0
    assert info["refused_urls"] == 0 and info["fetch_errors"] == 0 and info["invalid_actions"] == 0
    o2, *_ = env.step(f"<browse>{url}#2</browse>")
    o3, *_ = env.step(f"<browse>{url}#9</browse>")
    assert "(part 2 of 3)" in o2 and "w100 w101" in o2 and "(part 3 of 3)" in o3 and "w249" in o3
    assert "To read on" not in o3
    assert site.paths == ["/long"]  # reading on uses the episode's copy
    o4, *_ = env.step("<browse>Ed Wood</browse>")  # titles still come from the local page store
    assert "Page: Ed Wood (part 1 of" in o4
    o5, *_ = env.step("<search>Ed Wood</search>")  # search stays on the local index
    assert "Doc 1 (Title:" in o5
    *_, info = env.step("<answer>x</answer>")
    assert info["browses"] == [url, url, url, "Ed Wood"] and "Long Page" in env._seen_titles


def test_refused_urls_are_error_observations_counted_and_never_connect(servers):
    site, canary = servers
    env = _env(site)
    env.reset(seed=0)
    refused = [f"http://127.0.0.1:{canary.port}/", f"http://2130706433:{canary.port}/", f"http://[::1]:{canary.port}/",
               "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd", f"http://user:pass@127.0.0.1:{site.port}/long"]
    for n, url in enumerate(refused, 1):
        o, r, term, trunc, info = env.step(f"<browse>{url}</browse>")
        assert o.startswith("\n\n<information>Error: cannot browse") and o.rstrip().endswith(".</information>"), o
        assert info["refused_urls"] == n and info["invalid_actions"] == 0 and info["fetch_errors"] == 0
    assert canary.connections == 0 and site.connections == 0
    o, *_, info = env.step(f"<browse>http://127.0.0.1:{site.port}/missing</browse>")
    assert "HTTP 404" in o and info["fetch_errors"] == 1 and info["refused_urls"] == len(refused)


def test_allowlist_and_caps_are_env_kwargs(servers):
    site, _ = servers
    env = _env(site, web_allow_hosts=["en.wikipedia.org"])
    env.reset(seed=0)
    o, *_, info = env.step(f"<browse>http://127.0.0.1:{site.port}/long</browse>")
    assert "not in the allowlist" in o and info["refused_urls"] == 1 and site.connections == 0
    env = _env(site, web_max_bytes=100)
    env.reset(seed=0)
    o, *_, info = env.step(f"<browse>http://127.0.0.1:{site.port}/long</browse>")
    assert "larger than 100 bytes" in o and info["refused_urls"] == 1


def test_tool_call_protocol_reads_on_by_part(servers):
    site, _ = servers
    env = _env(site, protocol="tool_call")
    env.reset(seed=0)
    url = f"http://127.0.0.1:{site.port}/long"
    o, *_ = env.step('<tool_call>{"name": "browse", "arguments": {"title": "%s"}}</tool_call>' % url)
    assert o.strip().startswith("<tool_response>") and 'browse with "part": 2' in o
    o, *_ = env.step('<tool_call>{"name": "browse", "arguments": {"title": "%s", "part": 2}}</tool_call>' % url)
    assert "(part 2 of 3)" in o


def test_check_env_pickle_and_vector(servers):
    site, _ = servers
    env = _env(site)
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    env.step(f"<browse>http://127.0.0.1:{site.port}/long</browse>")
    clone = pickle.loads(pickle.dumps(env))
    assert clone._web_cache == {} and clone.web.test_only_allow == env.web.test_only_allow
    clone.reset(seed=0)
    assert "(part 1 of 3)" in clone.step(f"<browse>http://127.0.0.1:{site.port}/long</browse>")[0]
    vec = gym.make_vec("WebQA-Web-v0", num_envs=2, web_test_only_allow=[f"127.0.0.1:{site.port}"])
    vec.reset(seed=0)
    obs, *_, infos = vec.step([f"<browse>http://127.0.0.1:{site.port}/long</browse>", "<browse>http://10.0.0.1/</browse>"])
    assert "Page: Long Page" in obs[0] and "Error: cannot browse" in obs[1]
    assert list(infos["refused_urls"]) == [0, 1]
    vec.close()


def test_local_pages_are_unchanged_and_arguments_checked():
    env = gym.make("WebQA-v0").unwrapped
    env.reset(seed=0)
    o, *_, info = env.step("<browse>http://127.0.0.1:9/</browse>")  # a URL is a title lookup, never fetched
    assert "no page titled" in o and "refused_urls" not in info and env.web is None
    with pytest.raises(ValueError, match="pages must be one of"):
        gym.make("WebQA-v0", pages="internet")
    with pytest.raises(ValueError):
        gym.make("WebQA-Web-v0", web_max_bytes=0)
    with pytest.raises(ValueError, match="ip:port"):
        gym.make("WebQA-Web-v0", web_test_only_allow=["localhost"])
