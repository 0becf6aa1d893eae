"""Math-v0: the env contracts (check_env, determinism, pickling, no exceptions on bad replies),
answer extraction, and grading by math-verify with its counted fallback and time limits."""
import pickle
import threading

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401
from envs import math_grading as mg
from envs.math_grading import extract_answer, is_equivalent, last_boxed, normalise


@pytest.mark.parametrize("env_id,dataset,n", [("Math-v0", "gsm8k", 1319), ("Math-GSM8K-v0", "gsm8k", 1319),
                                              ("Math-GSM8K-train-v0", "gsm8k:train", 7473), ("Math-MATH500-v0", "math500", 500)])
def test_registry_lines(env_id, dataset, n):
    env = gym.make(env_id).unwrapped
    assert env.dataset == dataset and len(env.questions) == n


def test_check_env_determinism_and_pickling():
    check_env(gym.make("Math-v0").unwrapped, skip_render_check=True)
    a, b = gym.make("Math-v0"), gym.make("Math-v0")
    assert a.reset(seed=5) == b.reset(seed=5)
    assert a.reset(seed=5)[1]["question_id"] != a.reset(seed=6)[1]["question_id"]
    env = gym.make("Math-MATH500-v0").unwrapped
    env.reset(options={"index": 3})
    clone = pickle.loads(pickle.dumps(env))
    assert clone.questions[3]["id"] == env.questions[3]["id"] and clone._example == env._example


def test_an_episode_is_one_answer_graded_by_math_verify():
    env = gym.make("Math-v0")
    prompt, info = env.reset(options={"question_id": "gsm8k_test_0"})
    assert "\\boxed{}" in prompt and info["max_turns"] == 1 and "18" not in prompt.split("Please")[-1]
    obs, r, term, trunc, info = env.step("16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars. The answer is $\\boxed{\\$18.00}$.")
    assert (obs, r, term, trunc) == ("", 1.0, True, False)
    assert info["answer"] == "\\$18.00" and info["grader"] == "math_verify" and info["em"] == info["f1"] == 1.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step("again")


def test_math500_latex_answers():
    env = gym.make("Math-MATH500-v0").unwrapped
    env.reset(options={"question_id": "test/precalculus/807.json"})  # gold: \left( 3, \frac{\pi}{2} \right)
    assert env.step("so $\\boxed{(3,\\frac{\\pi}{2})}$")[1] == 1.0
    env.reset(options={"question_id": "test/precalculus/807.json"})
    assert env.step("so $\\boxed{(3,\\frac{\\pi}{3})}$")[1] == 0.0


@pytest.mark.parametrize("reply", ["I do not know.", "", "\\boxed{12", "<answer></answer> trailing"])
def test_malformed_replies_score_zero_with_a_flag(reply):
    env = gym.make("Math-v0")
    env.reset(seed=0)
    obs, r, term, trunc, info = env.step(reply)
    assert r == 0.0 and term
    if reply.startswith("<answer>"):  # an empty answer is an answer: graded, and wrong
        assert info["extracted"] and info["answer"] == ""
    else:
        assert info["extracted"] is False and info["grader"] == "none" and info["invalid_actions"] == 1


def test_privileged_has_the_reference_answer_and_solution_never_the_prompt():
    env = gym.make("Math-GSM8K-train-v0").unwrapped
    prompt, _ = env.reset(options={"index": 0})
    priv = env.privileged()
    assert priv["answers"] == ["72"] and priv["solution"].endswith("#### 72") and priv["solution"] not in prompt


def test_extraction_order_and_nesting():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("\\boxed{1} \\boxed{unclosed") == "1"  # the last closed one
    assert extract_answer("x\n#### 1,000") == ("1,000", "hashes")
    assert extract_answer("<answer> 7 </answer> and \\fbox{8}") == ("8", "boxed")
    assert extract_answer("<answer>3</answer> <answer>4</answer>") == ("4", "answer_tag")
    assert extract_answer("no answer") == (None, "none")


@pytest.mark.parametrize("pred,gold,ok", [
    ("72", "72", True), ("72.0", "72", True), ("1,000", "1000", True), ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac12", "\\frac{1}{2}", True), ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\{2, 1\\}", "\\{1,2\\}", True), ("[0, 1)", "[0,1)", True), ("1+x^2", "x^2+1", True),
    ("[0, 1]", "[0,1)", False), ("71", "72", False), ("\\text{(C)}", "C", True),
])
def test_symbolic_equivalence(pred, gold, ok):
    v = is_equivalent(pred, gold)
    assert v.correct is ok and v.how == "math_verify"


def test_fallback_is_used_only_where_the_library_cannot_parse_and_says_so():
    v = is_equivalent("?? n/a", ["?? N/A "])  # no expression math-verify can parse
    assert v.correct and v.how == "fallback"
    assert is_equivalent("???", "72").how == "fallback" and not is_equivalent("???", "72").correct
    assert normalise("\\text{ 5.0 }") == "5" and normalise("$1,234$") == "1234"
    assert is_equivalent("x" * (mg.MAX_ANSWER_CHARS + 1), "x").how == "too_long"


def test_a_pathological_answer_times_out_on_and_off_the_main_thread():
    bomb = "9^{9^{9^{9^{9}}}}"
    v = is_equivalent(bomb, "1", timeout=1)
    assert not v.correct and v.how == "timeout"
    got = []
    t = threading.Thread(target=lambda: got.append((is_equivalent(bomb, "1", timeout=1), is_equivalent("18", "18.0", timeout=1))))
    t.start()
    t.join(120)
    (slow, fine), = got
    assert slow.how == "timeout" and not slow.correct
    assert fine.correct and fine.how == "math_verify"  # the worker was replaced and grades again


@pytest.mark.parametrize("reply,gold,ok", [
    ("\\boxed{3}", "3.0", True), ("so \\boxed{1/2}", "\\frac{1}{2}", True), ("\\boxed{0.5}", "1/2", True),
    ("\\boxed{10\\text{ cm}}", "10", True), ("\\boxed{(1, 2]}", "(1,2]", True), ("\\boxed{(1, 2)}", "(1,2]", False),
])
def test_grader_table_through_the_env(reply, gold, ok):
    env = gym.make("Math-v0")
    env.reset(options={"example": {"question": "q", "answers": [gold]}})
    assert env.step(reply)[1] == (1.0 if ok else 0.0)


@pytest.mark.slow
def test_the_oracle_scores_one_on_all_of_gsm8k_test_and_math500(tmp_path):
    """The scripted oracle answers with the reference answer: extraction and grading must fit together."""
    import json

    from benchmarks.eval import main as eval_main

    assert eval_main(["model=oracle", "datasets=gsm8k,math500", "limit=null", f"out={tmp_path}"]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert s["gsm8k"]["episodes"] == 1319 and s["math500"]["episodes"] == 500
    assert s["gsm8k"]["em"] == 1.0 and s["math500"]["em"] == 1.0
