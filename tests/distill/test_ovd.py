"""ovd as published (mode=replace): turn prefixes scored, the student's turns kept up to the first
one scoring below the threshold, the teacher acting on from there; sources marked token by
token; the outcome reward is F1; grader read-outs fall back from log-probs to the parsed digit.
Teachers here are real: a scripted Python teacher, an HTTP chat server on 127.0.0.1, and
``agents.openai_server`` with a model whose tokenizer differs from the student's."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gymnasium as gym
import pytest

from agents.hf_policy import TransformersPolicy
from agents.models import tiny_random_model
from agents.policy import SamplingParams
from agents.rollout import SOURCE_ENV, SOURCE_STUDENT, SOURCE_TEACHER, rollout
from distill.config import resolve
from distill.methods.ovd import OVDConfig, prepare, score_prefixes
from distill.teachers.act import ChatActor, history_messages
from distill.teachers.http import HttpTeacher, digit_distribution
from distill.verbal import GraderConfig, grade, parse_score

ACTIONS = ["<search> capital of France </search>", "<answer> Paris </answer>"]


def turns_shown(messages) -> int:
    return len(re.findall(r"\[turn \d+, agent\]", messages[-1]["content"]))


class ScriptedTeacher:
    """Scores turn 1 with ``first`` and every later turn prefix with ``later``; acts by replying
    the next of ``ACTIONS``."""

    name, tokenizer = "scripted", None
    capabilities = frozenset({"score", "score_distribution", "act"})

    def __init__(self, first=7, later=2):
        self.first, self.later, self.scored = first, later, []

    def _digit(self, msgs):
        k = turns_shown(msgs)
        self.scored.append(k)
        return self.first if k == 1 else self.later

    def score_distribution(self, messages):
        return [[1.0 if d == digit else 0.0 for d in range(10)] for digit in map(self._digit, messages)]

    def score(self, messages, sample=False, seed=0):
        return [f"Score: {self._digit(m)}" for m in messages]

    def chat(self, messages, sampling):
        return [ACTIONS[min(sum(m["role"] == "assistant" for m in msgs) - 1, 1)] + " and more text" for msgs in messages]


class Ctx:
    def __init__(self, policy, roll, seed=0, group_size=2):
        self.policy, self.rollout, self.seed, self.state, self.group_size = policy, roll, seed, {}, group_size


def student_rollout(max_turns=3, questions=2, group=2):
    model, tok = tiny_random_model("small", seed=0)
    policy = TransformersPolicy(model, tok)
    make_env = lambda: gym.make("WebQA-v0", max_turns=max_turns, reward="f1")  # noqa: E731
    qids = [q["id"] for q in make_env().unwrapped.questions[:questions]]

    def roll(pol, opts, g=1):
        return rollout(pol, make_env, opts, g, SamplingParams(seed=3), 16, 2048, seed=3, with_privileged=True)

    return policy, tok, roll, roll(policy, [{"question_id": q} for q in qids], group)


def test_replace_keeps_student_turns_up_to_the_first_low_score_then_the_teacher_acts():
    policy, tok, roll, trajs = student_rollout()
    assert all(len(t.actions) >= 2 for t in trajs)  # a random model does not answer: every episode has turns to cut
    teacher = ScriptedTeacher(first=7, later=2)
    sig = prepare(trajs, teacher, OVDConfig(threshold=5, train_on_teacher_tokens=False), Ctx(policy, roll))
    # lazily scored: turn 1 (accepted) and turn 2 (rejected) of each trajectory, never turn 3
    assert sorted(teacher.scored) == [1] * len(trajs) + [2] * len(trajs)
    assert sig.metrics["accept_rate"] == 0.0 and sig.metrics["replaced_trajectories"] == len(trajs)
    assert sig.metrics["replaced_turns"] == sum(len(t.actions) - 1 for t in trajs)
    from distill.advantages import sample_advantages

    want = sample_advantages([t.reward for t in sig.trajectories], [t.num_agent_tokens for t in sig.trajectories], 2)
    assert sig.advantages == want  # GRPO on the mixed trajectories' outcome rewards (Eq. 4)
    for old, new, mask in zip(trajs, sig.trajectories, sig.train_masks):
        a, b = old.info["turn_spans"][0]
        assert new.completion_ids[a:b] == old.completion_ids[a:b]  # the kept turn, token for token
        assert new.actions[0] == old.actions[0] and new.info["replaced_from_turn"] == 1
        assert new.actions[1:] == ACTIONS  # the teacher's turns, cut after their first action
        spans = new.info["turn_spans"]
        for k, (s, e) in enumerate(spans):
            want = SOURCE_STUDENT if k == 0 else SOURCE_TEACHER
            assert new.sources[s:e] == [want] * (e - s)
            if k:
                assert new.completion_ids[s:e] == tok.encode(ACTIONS[k - 1], add_special_tokens=False)
        agent = {p for s, e in spans for p in range(s, e)}
        for p, (src, lm) in enumerate(zip(new.sources, new.loss_mask)):
            assert (src == SOURCE_ENV) == (p not in agent) == (lm == 0)
        assert mask == [1] * (b - a) + [0] * (new.num_agent_tokens - (b - a))  # masked: teacher tokens do not train
        assert new.reward == new.f1 and new.answer.strip() == "Paris"  # the outcome reward: F1


def test_all_accepted_keeps_the_student_trajectory_and_scores_every_turn():
    policy, tok, roll, trajs = student_rollout(questions=1)
    teacher = ScriptedTeacher(first=9, later=9)
    cfg = OVDConfig(threshold=5, train_on_teacher_tokens=True, grader={"prompt": "answer_first"})  # shows every turn
    sig = prepare(trajs, teacher, cfg, Ctx(policy, roll))
    assert sig.metrics["accept_rate"] == 1.0 and sig.metrics["teacher_tokens"] == 0
    assert all(a is b for a, b in zip(sig.trajectories, trajs))
    assert sorted(teacher.scored) == sorted(k + 1 for t in trajs for k in range(len(t.actions)))
    from distill.advantages import sample_advantages

    assert sig.advantages == sample_advantages([t.reward for t in trajs], [t.num_agent_tokens for t in trajs], 2)


def test_an_exact_ids_teacher_continues_on_a_continuous_batch_as_in_lockstep():
    """A local teacher sharing the student's tokenizer acts through its continuous scheduler
    (rows whose turn ends leave the decode batch while the others keep decoding) behind the
    replayed student turns; greedy, it writes what the lockstep schedule writes, token for token,
    including a turn it continues from the student's first tokens."""
    from distill.methods.ovd import continue_with_teacher
    from distill.teachers.act import teacher_actor
    from distill.teachers.local import LocalTeacher

    policy, tok, _, trajs = student_rollout(max_turns=3, questions=2, group=2)
    teacher = LocalTeacher(tiny_random_model("small", seed=1)[0], tok, name="other")
    actor = teacher_actor(teacher, policy, tok)
    make_env = lambda: gym.make("WebQA-v0", max_turns=3, reward="f1")  # noqa: E731

    def roll_with(schedule):
        return lambda pol, opts, g=1: rollout(pol, make_env, opts, g, SamplingParams(seed=3), 16, 2048, seed=3,
                                              with_privileged=True, schedule=schedule)

    cuts = {i: min(i, len(t.actions) - 1) for i, t in enumerate(trajs)}
    partial = {3: 2}  # trajectory 3 keeps the first 2 tokens of its turn cuts[3]; the teacher finishes it
    a = continue_with_teacher(trajs, cuts, actor, policy, roll_with("lockstep"), temperature=0.0, partial=partial)
    b = continue_with_teacher(trajs, cuts, actor, policy, roll_with("continuous"), temperature=0.0, partial=partial)
    for i, cut in cuts.items():
        assert b[i].completion_ids == a[i].completion_ids and b[i].sources == a[i].sources
        assert b[i].loss_mask == a[i].loss_mask and b[i].actions == a[i].actions
        spans = b[i].info["turn_spans"]
        for k, (s, e) in enumerate(spans[:cut]):  # the student's kept turns, token for token
            assert b[i].completion_ids[s:e] == trajs[i].completion_ids[s:e] and set(b[i].sources[s:e]) == {SOURCE_STUDENT}
        s, e = spans[cut]
        head = 2 if i in partial else 0
        assert b[i].completion_ids[s:s + head] == trajs[i].completion_ids[s:s + head]
        assert b[i].sources[s:e] == [SOURCE_STUDENT] * head + [SOURCE_TEACHER] * (e - s - head)


def test_teacher_tokens_train_by_default():
    policy, tok, roll, trajs = student_rollout(questions=1, group=1)
    assert OVDConfig().train_on_teacher_tokens and resolve(["method=ovd"])[1].train_on_teacher_tokens
    sig = prepare(trajs, ScriptedTeacher(first=1), OVDConfig(threshold=5), Ctx(policy, roll))
    new = sig.trajectories[0]
    assert new.info["replaced_from_turn"] == 0 and set(s for s in new.sources if s) == {SOURCE_TEACHER}
    assert sig.train_masks[0] == [1] * new.num_agent_tokens and sig.metrics["teacher_tokens"] == new.num_agent_tokens


def test_parse_score_takes_the_last_score():
    assert parse_score("Score: 3. On reflection the answer matches. Score: 8") == 8
    assert parse_score("**7**") == 7 and parse_score("no digit") is None and parse_score(None) is None


def test_ovd_defaults_are_the_papers():
    cfg, mcfg = resolve(["method=ovd"])
    assert mcfg.mode == "replace" and cfg.env.reward == "f1" and mcfg.grader["readout"] == "expected"
    assert resolve(["method=grpo"])[0].env.reward == "em"
    assert resolve(["method=ovd", "env.reward=em"])[0].env.reward == "em"
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match="grader"):
        resolve(["method=ovd", "+method.grader.colour=1"])


# -- over HTTP ---------------------------------------------------------------------------------------
class ChatServer(BaseHTTPRequestHandler):
    """A chat endpoint: grades with (or, when ``with_logprobs`` is off, without) top log-probs of
    the digit token, and acts with the next of ``ACTIONS``."""

    with_logprobs = True

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        msgs = body["messages"]
        if msgs[0]["role"] == "system":  # a grading request
            digit = 7 if turns_shown(msgs) == 1 else 2
            choice = {"message": {"role": "assistant", "content": f"Score: {digit}"}, "finish_reason": "stop"}
            if body.get("logprobs") and self.with_logprobs:  # P(digit) = 0.5, P(digit - 1) = 0.5
                top = [{"token": str(digit), "logprob": -0.6931}, {"token": str(digit - 1), "logprob": -0.6931},
                       {"token": "x", "logprob": -9.0}]
                choice["logprobs"] = {"content": [{"token": "Score", "logprob": 0.0, "top_logprobs": []},
                                                  {"token": ":", "logprob": 0.0, "top_logprobs": []},
                                                  {"token": " ", "logprob": 0.0, "top_logprobs": []},
                                                  {"token": str(digit), "logprob": -0.6931, "top_logprobs": top}]}
        else:  # acting: the server strips the stop string, as OpenAI does
            action = ACTIONS[max(0, min(sum(m["role"] == "assistant" for m in msgs) - 1, 1))]
            stop = next(s for s in body["stop"] if action.endswith(s))
            choice = {"message": {"role": "assistant", "content": action[: -len(stop)]}, "finish_reason": "stop",
                      "stop_reason": stop}
        data = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def chat_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ChatServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    ChatServer.with_logprobs = True


def test_http_grader_reads_the_expected_digit_and_falls_back_to_the_parsed_one(chat_url):
    teacher = HttpTeacher(chat_url)
    msgs = [[{"role": "system", "content": "grade"}, {"role": "user", "content": "[turn 1, agent] x"}]]
    scores, m = grade(teacher, msgs, GraderConfig(readout="expected"))
    assert scores == [pytest.approx(6.5)] and m["score_fallback"] == 0  # 0.5 * 7 + 0.5 * 6
    ChatServer.with_logprobs = False
    scores, m = grade(teacher, msgs, GraderConfig(readout="expected"))
    assert scores == [7.0] and m["score_fallback"] == 1
    scores, m = grade(teacher, msgs, GraderConfig(readout="digit"))
    assert scores == [7.0] and m["score_fallback"] == 0
    assert digit_distribution([{"token": "Score", "logprob": 0}, {"token": ": 4", "logprob": 0}]) is None


def test_http_chat_teacher_continues_a_student_with_another_tokenizer(chat_url):
    policy, tok, roll, trajs = student_rollout(questions=1)
    teacher = HttpTeacher(chat_url)
    sig = prepare(trajs, teacher, OVDConfig(threshold=5), Ctx(policy, roll))
    for old, new in zip(trajs, sig.trajectories):
        assert new.actions[1:] == ACTIONS and new.answer.strip() == "Paris"
        s, e = new.info["turn_spans"][1]
        assert new.sources[s:e] == [SOURCE_TEACHER] * (e - s)
        assert new.completion_ids[s:e] == tok.encode(ACTIONS[0], add_special_tokens=False)
    assert sig.metrics["teacher_score_mean"] == pytest.approx(4.0)  # turn 1: 0.5*7 + 0.5*6, turn 2: 0.5*2 + 0.5*1


def test_history_messages_alternate_actions_and_observations():
    ctx = {"prompt": "Q?", "actions": ["<search> a </search>", "<search> b </search>"], "observations": ["A", "B"]}
    assert [m["role"] for m in history_messages(ctx)] == ["user", "assistant", "user", "assistant", "user"]
    assert history_messages(ctx)[3]["content"] == "<search> b </search>"


@pytest.mark.slow
def test_chat_actor_over_openai_server_with_another_tokenizer():
    """``agents.openai_server`` serves a model with a byte-level tokenizer; the student has
    SmolLM2's. The teacher's text replies become student-tokenizer ids marked as the teacher's."""
    from agents.openai_server import ModelServerProcess
    from distill.methods.ovd import continue_with_teacher

    policy, tok, roll, trajs = student_rollout(questions=1, group=1)
    with ModelServerProcess("tiny-random", ["--threads", "1"]) as srv:
        actor = ChatActor(HttpTeacher(srv.url), policy)
        mixed = continue_with_teacher(trajs, {0: 1}, actor, policy, roll, temperature=1.0)[0]
    assert not mixed.info["teacher_failed"] and len(mixed.actions) >= 2
    old = trajs[0]
    a, b = old.info["turn_spans"][0]
    assert mixed.completion_ids[a:b] == old.completion_ids[a:b] and mixed.sources[a:b] == [SOURCE_STUDENT] * (b - a)
    for k, (s, e) in enumerate(mixed.info["turn_spans"][1:], start=1):
        assert mixed.sources[s:e] == [SOURCE_TEACHER] * (e - s)
        assert mixed.completion_ids[s:e] == tok.encode(mixed.actions[k], add_special_tokens=False)[: e - s]


def test_train_ovd_with_an_http_teacher(tmp_path, chat_url):
    """The whole trainer, ``teacher=http``: every first turn scores 6.5 < 9.5, so the teacher
    replaces every trajectory; its tokens are marked in the logged trajectories and, with
    ``train_on_teacher_tokens``, train."""
    from distill.train import train

    cfg, mcfg = resolve(["model=tiny", "method=ovd", "teacher=http", f"teacher.url={chat_url}", "method.threshold=9.5",
                         "method.grader.prompt=answer_first",  # the fake server grades by the turns it is shown
                         "method.train_on_teacher_tokens=true", "env.id=ToyVowel-v0", "env.eval_id=ToyVowel-eval-v0",
                         "steps=1", "questions_per_step=2", "group_size=2", "max_tokens_per_turn=12", "max_total_tokens=32",
                         "eval.questions=0", "progress=false", "threads=1", "tensorboard=false"])
    train(cfg, mcfg, tmp_path / "run", resume=False)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert line["replaced_trajectories"] == 4 and line["accept_rate"] == 0.0 and line["teacher_tokens"] > 0
    assert line["teacher_score_mean"] == pytest.approx(6.5) and "logprob_drift" in line
    # every student turn was replaced: what trains is the teacher's; what the rollout generated is counted apart
    assert line["agent_tokens"] == line["teacher_tokens"] and line["sampled_tokens"] >= 4
    assert line["seconds_scoring"] > 0 and line["seconds_continuation"] > 0  # the teacher phase, split
    recs = [json.loads(x) for x in (tmp_path / "run" / "trajectories" / "step_000001.jsonl").read_text().splitlines()]
    assert all(set(r["sources"]) == {SOURCE_TEACHER} for r in recs)


def test_positive_teacher_masks_keep_teacher_tokens_only_where_the_advantage_is_positive():
    from distill.methods.ovd import positive_teacher_masks

    S, T = SOURCE_STUDENT, SOURCE_TEACHER
    masks = [[1, 1, 1], [1, 1], [1, 0], [1]]
    sources = [[S, T, T], [T, T], [S, T], [T]]
    adv = [[0.5, 0.5, 0.5], [-1.0, -1.0], [-0.2, -0.2], None]  # None: a dropped trajectory
    assert positive_teacher_masks(masks, sources, adv) == [[1, 1, 1], [0, 0], [1, 0], [1]]
    assert positive_teacher_masks([[1, 1]], [[T, T]], [[0.0, 0.0]]) == [[0, 0]]  # a tied group: nothing pushed
    with pytest.raises(ValueError, match="teacher_token_advantage"):
        OVDConfig(teacher_token_advantage="negative")


def test_positive_mode_trains_no_teacher_token_of_a_tied_group():
    """Through prepare: the scripted teacher answers every episode alike, so each group ties (all
    advantages 0): with ``teacher_token_advantage=positive`` none of its tokens trains, while the
    student's kept first turns still do."""
    policy, tok, roll, trajs = student_rollout()
    sig = prepare(trajs, ScriptedTeacher(first=7, later=2), OVDConfig(threshold=5, teacher_token_advantage="positive"),
                  Ctx(policy, roll))
    for new, mask in zip(sig.trajectories, sig.train_masks):
        src = [s for s, lm in zip(new.sources, new.loss_mask) if lm]
        assert all(a == 0.0 for a in sig.advantages[sig.trajectories.index(new)])
        assert [m for m, s in zip(mask, src) if s == SOURCE_TEACHER] == [0] * src.count(SOURCE_TEACHER)
        assert [m for m, s in zip(mask, src) if s == SOURCE_STUDENT] == [1] * src.count(SOURCE_STUDENT)
        assert src.count(SOURCE_TEACHER) > 0 and src.count(SOURCE_STUDENT) > 0
