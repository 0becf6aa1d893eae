"""The OpenAI-compatible server and OpenAIPolicy, over a real server process on 127.0.0.1.

The server runs ``--model tiny-random`` (the seeded ``tiny_random_model("bytes")``), so this
process can build the very same model and compare: ids and log-probs through HTTP equal the
in-process TransformersPolicy, echo log-probs equal a forward pass. Faults are made by a small
stdlib proxy in front of the real server (500s, a late start, a request rewrite).
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gymnasium as gym
import pytest
import requests
import torch

import envs
from agents.hf_policy import TransformersPolicy
from agents.http_policy import EndpointError, OpenAIPolicy, parse_model_url
from agents.models import tiny_random_model
from agents.openai_server import ModelServerProcess
from agents.policy import SamplingParams
from agents.rollout import rollout
from common.subprocess_server import free_port

GREEDY = SamplingParams(temperature=0, max_new_tokens=16, stop=())


@pytest.fixture(scope="module")
def server_and_local():
    srv = ModelServerProcess("tiny-random", ["--threads", "1"]).start(wait=False)  # starts while we build ours
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add overhead (and the server runs on one)
    try:
        model, tok = tiny_random_model("bytes", seed=0)
        assert srv.wait_ready(), srv.log_text()
        yield srv, TransformersPolicy(model, tok)
    finally:
        torch.set_num_threads(threads)
        srv.stop()


@pytest.fixture(scope="module")
def server(server_and_local):
    return server_and_local[0]


@pytest.fixture(scope="module")
def local(server_and_local):
    return server_and_local[1]


@pytest.fixture(scope="module")
def client(server):
    pol = OpenAIPolicy(server.url, retries=1, backoff=0.05)
    yield pol
    pol.close()


def _assert_same(http, ref):
    assert [c.token_ids for c in http] == [c.token_ids for c in ref]
    assert [c.text for c in http] == [c.text for c in ref]
    assert [c.finish_reason for c in http] == [c.finish_reason for c in ref]
    for h, r in zip(http, ref):
        assert h.logprobs == pytest.approx(r.logprobs, abs=1e-4)
        assert not h.extra.get("retokenized")


# --- exactness -----------------------------------------------------------------------------------


def test_models_endpoint_names_the_tokenizer(server, client, local):
    data = requests.get(server.url + "/models", timeout=5).json()["data"][0]
    assert data["id"] == "tiny-random" and data["tokenizer"] == "bytes"
    assert client.model == "tiny-random" and client.tokenizer.get_vocab() == local.tokenizer.get_vocab()


def test_token_id_completions_equal_in_process_greedy(client, local):
    prompts = [local.prompt_ids(q) for q in ("Who wrote Hamlet?", "capital of France", "x")]
    assert prompts == [client.prompt_ids(q) for q in ("Who wrote Hamlet?", "capital of France", "x")]
    ref = [local.generate([p], GREEDY)[0] for p in prompts]
    _assert_same(client.generate(prompts, GREEDY), ref)


def test_stop_strings_cut_like_the_in_process_policy(client, local):
    p = local.prompt_ids("Where is the Eiffel tower?")
    free = local.generate([p], GREEDY)[0].text
    stop = free[5:7]  # a string the greedy continuation is known to contain
    sp = SamplingParams(temperature=0, max_new_tokens=16, stop=(stop, "never-seen"))
    ref = local.generate([p], sp)
    got = client.generate([p], sp)
    _assert_same(got, ref)
    assert got[0].finish_reason == "stop" and got[0].text.endswith(stop)


def test_echo_logprobs_equal_a_forward_pass(server, local):
    ids = local.prompt_ids("Were Scott Derrickson and Ed Wood of the same nationality?")
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2, "return_tokens_as_token_ids": True}
    lp = requests.post(server.url + "/completions", json=body, timeout=30).json()["choices"][0]["logprobs"]
    with torch.no_grad():
        ref = torch.log_softmax(local.model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    expect = ref.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()
    assert lp["tokens"] == [f"token_id:{t}" for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(expect, abs=1e-4)
    best = ref.argmax(-1).tolist()
    assert all(f"token_id:{b}" in d and len(d) == 2 for b, d in zip(best, lp["top_logprobs"][1:]))
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_rollout_through_http_equals_in_process(client, local):
    assert "WebQA-v0" in envs.REGISTRY
    kw = dict(reset_options=[{"index": 0}, {"index": 2}], sampling=SamplingParams(temperature=0),
              max_tokens_per_turn=12, max_total_tokens=400)
    ref = rollout(local, lambda: gym.make("WebQA-v0"), **kw)
    got = rollout(client, lambda: gym.make("WebQA-v0"), **kw)
    for g, r in zip(got, ref):
        assert (g.prompt_ids, g.completion_ids, g.loss_mask, g.actions) == (r.prompt_ids, r.completion_ids, r.loss_mask, r.actions)
        assert g.logprobs == pytest.approx(r.logprobs, abs=1e-4)


def test_chat_api_retokenises_and_marks_it(server, local):
    pol = OpenAIPolicy(server.url, api="chat", retries=0)
    p = pol.prompt_ids("Who wrote Hamlet?")
    ref = local.generate([p], GREEDY)[0]
    got = pol.generate([p], GREEDY)[0]
    assert got.extra["retokenized"] and got.token_ids == ref.token_ids and got.text == ref.text
    assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    # a continued episode: the generated text goes back as an assistant message to continue
    p2 = p + ref.token_ids[:4]
    ref2 = local.generate([p2], GREEDY)[0]
    assert pol.generate([p2], GREEDY)[0].token_ids == ref2.token_ids
    pol.close()


def test_strict_openai_chat_puts_back_the_stop_the_server_strips(server, local):
    pol = OpenAIPolicy(server.url, api="chat", retries=0, strict_openai=True)
    p = pol.prompt_ids("Where is the Eiffel tower?")
    stop = local.generate([p], GREEDY)[0].text[5:7]
    sp = SamplingParams(temperature=0, max_new_tokens=16, stop=(stop,))
    got, ref = pol.generate([p], sp)[0], local.generate([p], sp)[0]
    assert got.finish_reason == ref.finish_reason == "stop"
    assert got.text == ref.text and got.token_ids == ref.token_ids and got.extra["retokenized"]
    pol.close()


# --- errors and retries ----------------------------------------------------------------------------


def test_malformed_requests_get_400_and_the_server_stays_up(server):
    url = server.url + "/completions"
    r = requests.post(url, data=b'{"prompt": [1, 2', timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    for bad, param in [({"prompt": [1, 2], "max_tokens": -1}, "max_tokens"), ({"prompt": [10**9]}, "prompt"),
                       ({"prompt": []}, "prompt"), ({"prompt": [1], "n": 99}, "n"), ({"prompt": [1], "max_tokens": 0}, "max_tokens"),
                       ({"prompt": [1], "temperature": "hot"}, "temperature"), ({"prompt": [1], "logprobs": 99}, "logprobs"),
                       ({"prompt": [1], "stop": [3]}, "stop")]:
        r = requests.post(url, json=bad, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    assert requests.post(server.url + "/chat/completions", json={"messages": "hi"}, timeout=10).status_code == 400
    assert requests.post(url, data=b"[1, 2]", timeout=10).status_code == 400
    assert requests.get(server.url + "/nothing", timeout=10).status_code == 404
    assert requests.get(server.base + "/health", timeout=10).json()["status"] == "ok"
    ok = requests.post(url, json={"prompt": "hello", "max_tokens": 2}, timeout=10)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_4xx_raises_a_clear_error(server):
    pol = OpenAIPolicy(server.url, retries=3, backoff=0.01)
    with pytest.raises(EndpointError) as info:
        pol.generate([[10**9]], GREEDY)
    msg = str(info.value)
    assert server.url + "/completions" in msg and "400" in msg and "out of range" in msg
    assert info.value.status == 400 and pol.retries_done == 0  # a client error is not retried
    pol.close()


class Proxy:
    """A stdlib HTTP proxy to the real server that can fail the first N requests with 500,
    start listening late, or rewrite request bodies."""

    def __init__(self, target: str, fail_first: int = 0, rewrite=None, port: int | None = None,
                 text_prompts_only: bool = False):
        self.target, self.fail_left, self.rewrite = target, fail_first, rewrite
        self.text_prompts_only = text_prompts_only
        self.port = port or free_port()
        self.seen = 0
        proxy = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _relay(self, method):
                proxy.seen += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                if proxy.fail_left > 0:
                    proxy.fail_left -= 1
                    return self._answer(500, b'{"error": {"message": "injected failure"}}')
                if body and proxy.text_prompts_only and not isinstance(json.loads(body).get("prompt", ""), str):
                    # what llama-cpp-python's server answers to a list of token ids
                    return self._answer(422, b'{"detail": [{"type": "string_type", "loc": ["body", "prompt"]}]}')
                if body and proxy.rewrite:
                    body = json.dumps(proxy.rewrite(json.loads(body))).encode()
                req = urllib.request.Request(proxy.target + self.path, data=body, method=method,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        self._answer(r.status, r.read())
                except urllib.error.HTTPError as e:
                    self._answer(e.code, e.read())

            def _answer(self, status, data):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._relay("GET")

            def do_POST(self):  # noqa: N802
                self._relay("POST")

        self.handler = H
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, delay: float = 0.0) -> "Proxy":
        if not delay:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)

        def run():
            if delay:
                time.sleep(delay)
                self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
            self.httpd.serve_forever(poll_interval=0.05)

        threading.Thread(target=run, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()


def test_retries_on_5xx_then_succeeds(server, local):
    proxy = Proxy(server.base, fail_first=2).start()
    try:
        pol = OpenAIPolicy(proxy.url, model="tiny-random", tokenizer="bytes", retries=3, backoff=0.05)
        p = local.prompt_ids("retry me")
        _assert_same(pol.generate([p], GREEDY), local.generate([p], GREEDY))
        assert pol.retries_done == 2 and proxy.seen == 3
        proxy.fail_left = 10
        with pytest.raises(EndpointError, match=r"failed after 4 attempt\(s\).*HTTP 500.*injected failure"):
            pol.generate([p], GREEDY)
        pol.close()
    finally:
        proxy.stop()


def test_retries_until_a_late_server_listens(server, local):
    proxy = Proxy(server.base).start(delay=0.6)  # nothing listens on the port for 0.6 s
    try:
        pol = OpenAIPolicy(proxy.url, model="tiny-random", tokenizer="bytes", retries=6, backoff=0.1)
        p = local.prompt_ids("late")
        _assert_same(pol.generate([p], GREEDY), local.generate([p], GREEDY))
        assert pol.retries_done >= 1
        pol.close()
    finally:
        proxy.stop()


def test_plain_token_strings_fall_back_to_retokenising(server, local):
    def strip(body):
        body.pop("return_tokens_as_token_ids", None)
        return body

    proxy = Proxy(server.base, rewrite=strip).start()
    try:
        pol = OpenAIPolicy(proxy.url, model="tiny-random", tokenizer="bytes", retries=0)
        p = local.prompt_ids("plain tokens")
        got, ref = pol.generate([p], GREEDY)[0], local.generate([p], GREEDY)[0]
        assert got.extra["retokenized"] is True
        assert got.token_ids == ref.token_ids and got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
        pol.close()
    finally:
        proxy.stop()


def test_a_server_that_takes_only_text_prompts_gets_text(server, local):
    proxy = Proxy(server.base, text_prompts_only=True).start()
    try:
        pol = OpenAIPolicy(proxy.url, model="tiny-random", tokenizer="bytes", retries=0)
        p = local.prompt_ids("text only")
        for _ in range(2):  # the first call learns it (one refused request), the second sends text at once
            got, ref = pol.generate([p], GREEDY)[0], local.generate([p], GREEDY)[0]
            assert got.extra["retokenized"] is True and got.token_ids == ref.token_ids
        assert pol.text_prompts and proxy.seen == 3
        pol.close()
    finally:
        proxy.stop()


def test_parse_model_url():
    assert parse_model_url("http://127.0.0.1:8001/v1#small") == ("http://127.0.0.1:8001/v1", "small")
    assert parse_model_url("http://h:1/v1") == ("http://h:1/v1", None)


# --- the real small model (slow) ------------------------------------------------------------------


@pytest.mark.slow
def test_real_small_model_rollout_through_the_server_equals_in_process():
    from agents.models import MissingModelPackage, load_model

    try:
        model, tok = load_model("small")
    except MissingModelPackage as exc:
        pytest.skip(str(exc))
    torch.set_num_threads(1)
    local = TransformersPolicy(model, tok)
    kw = dict(reset_options=[{"index": 0}, {"index": 1}], sampling=SamplingParams(temperature=0),
              max_tokens_per_turn=32, max_total_tokens=700)
    ref = rollout(local, lambda: gym.make("WebQA-v0"), **kw)
    with ModelServerProcess("small", ["--threads", "1"]) as srv:
        pol = OpenAIPolicy(srv.url)  # tokenizer named by the server ("small")
        got = rollout(pol, lambda: gym.make("WebQA-v0"), **kw)
        pol.close()
    for g, r in zip(got, ref):
        assert g.prompt_ids == r.prompt_ids and g.completion_ids == r.completion_ids and g.loss_mask == r.loss_mask
        assert g.actions == r.actions and g.logprobs == pytest.approx(r.logprobs, abs=1e-3)
    assert sum(g.loss_mask.count(1) for g in got) >= 8  # something was generated


def test_serve_model_picks_and_prints_a_backend(capsys):
    import importlib.util

    from agents.serve_model import main

    assert main(["small", "--backend", "transformers", "--dry-run", "--port", "9"]) == 0
    assert "backend transformers (agents.openai_server)" in capsys.readouterr().out
    if importlib.util.find_spec("llama_cpp") is None:
        assert main(["small", "--dry-run"]) == 0  # auto without llama.cpp: transformers, and says why
        assert "llama_cpp not installed" in capsys.readouterr().out
    else:
        assert main(["/models/x.gguf", "--dry-run", "--threads", "1"]) == 0
        out = capsys.readouterr().out
        assert "llama_cpp.server --model /models/x.gguf --model_alias x" in out and "--n_threads 1" in out


def test_serve_model_vllm_backend_is_named_or_refused(capsys):
    from agents.serve_model import main
    from agents.vllm_policy import vllm_device

    if vllm_device() is None:
        with pytest.raises(SystemExit):
            main(["small", "--backend", "vllm", "--dry-run"])
        assert "vLLM cannot run here" in capsys.readouterr().err
    else:
        assert main(["small", "--backend", "vllm", "--dry-run", "--port", "9", "--enforce-eager"]) == 0
        out = capsys.readouterr().out
        assert ("vllm.entrypoints.cli.main serve" in out or "vllm.entrypoints.openai.api_server --model" in out)
        assert "--served-model-name small" in out
        assert "--port 9" in out and out.rstrip().endswith("--enforce-eager")  # unknown args go on to vllm serve
