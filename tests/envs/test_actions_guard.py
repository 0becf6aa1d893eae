"""The tool_call parser against hostile JSON (issue 18, items 3 and 4): every input is an action or
an ``Error:`` observation, never an exception. Random and adversarial JSON through hypothesis."""
from __future__ import annotations

import json

import gymnasium as gym
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import envs  # noqa: F401 - registers the ids
from envs.actions import parse_action

GIANT_INT = '<tool_call>{"name":"search","arguments":{"query":' + "9" * 5000 + "}}</tool_call>"


def tool_call(body: str) -> str:
    return f"<tool_call>{body}</tool_call>"


@pytest.fixture(scope="module")
def env():
    e = gym.make("WebQA-ToolCall-v0")
    yield e
    e.close()


def test_giant_integer_is_an_error_observation_not_an_exception(env):
    """Issue 18 item 3, verbatim: this raised ValueError (Exceeds the limit (4300 digits))."""
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(GIANT_INT)
    assert "Error:" in obs and "digits" in obs, obs
    assert not terminated and info["invalid_actions"] == 1


@pytest.mark.parametrize("body, words", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # 100,000-deep nesting
    ('{"name":"search","arguments":' + '{"a":' * 5000 + "1" + "}" * 5001, "not valid JSON"),
    ('{"name":"search","arguments":' + "[" * 40 + "]" * 40 + "}", "not valid JSON"),  # over the depth limit
    ('{"name":"search","arguments":{"query":-' + "9" * 5000 + "}}", "digits"),
    ('{"name":"browse","arguments":{"title":"Ed Wood","part":' + "9" * 4400 + "}}", "digits"),
    ('{"name":"search","arguments":{"query":NaN}}', "not valid JSON"),
    ('{"name":"search","arguments":{"query":1e999}}', "not valid JSON"),
    ('{"name":"search","arguments":"{\\"query\\": ' + "9" * 5000 + '}"}', "not valid JSON"),  # arguments as a string
    ('{"name":"search","arguments":"' + "[" * 3000 + '"}', "not valid JSON"),
])
def test_hostile_tool_call_json_is_invalid_with_a_reason(body, words):
    from envs.actions import _parse_tool_call

    a = _parse_tool_call(body)  # the JSON part directly: no action-length cap in front of it
    assert a.kind == "invalid" and words in a.error, a
    b = parse_action(tool_call(body), "tool_call")  # through the whole parser (the length cap may answer first)
    assert b.kind == "invalid" and b.error


def test_hostile_tool_calls_through_the_env(env):
    env.reset(seed=0)
    for body in ["[" * 9000 + "]" * 9000, '{"name":"search","arguments":{"query":' + "9" * 19_000 + "}}",
                 '{"name":"browse","arguments":{"title":"x","part":99999999999999999999}}']:
        obs, *_ = env.step(tool_call(body))
        assert "Error:" in obs or "page" in obs.lower(), obs


def test_numbers_within_the_limits_still_work():
    a = parse_action(tool_call('{"name":"search","arguments":{"query":1984}}'), "tool_call")
    assert (a.kind, a.arg) == ("search", "1984")
    b = parse_action(tool_call('{"name":"browse","arguments":{"title":"Ed Wood","part":3}}'), "tool_call")
    assert (b.kind, b.arg, b.part) == ("browse", "Ed Wood", 3)


# -- property-based: random and adversarial JSON ---------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
names = st.sampled_from(["search", "browse", "answer", "nope", ""]) | st.text(max_size=10)
calls = st.fixed_dictionaries({"name": names, "arguments": json_values | st.dictionaries(
    st.sampled_from(["query", "title", "answer", "part"]), json_values, max_size=3)})
fragments = st.sampled_from(["[", "]", "{", "}", '"', ",", ":", "9" * 4400, "-", "1e999", "NaN", "Infinity",
                             "\\u0000", "\\ud800", "null", "</tool_call>", "<tool_call>", "<think>", "\x00", "é"])
adversarial = st.lists(fragments, max_size=40).map("".join) | st.builds(
    lambda open_, n: open_ * n, st.sampled_from(["[", '{"a":', '{"name":"search","arguments":']), st.integers(0, 8000))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(calls.map(json.dumps), json_values.map(json.dumps), adversarial, st.text(max_size=200)))
def test_parser_never_raises(body):
    a = parse_action(tool_call(body), "tool_call")
    assert a.kind in ("search", "browse", "answer", "invalid")
    assert a.valid or a.error


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(calls.map(json.dumps), adversarial))
def test_env_step_never_raises(env, body):
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(tool_call(body))
    assert isinstance(obs, str) and isinstance(reward, float)
    if info["action"] == "invalid":
        assert "Error:" in obs
