"""Every method in the table: a 2-step run on a tiny random model changes the adapter and logs
finite metrics; the METHODS.md identities (zero signal and zero gradient when teacher equals
student; observation tokens get no gradient), parametrised over the table with declared, reasoned
exemptions; capability checks.

A new method is tested by adding its table line; give it a teacher here only if the default
(a second tiny random model with the student's tokenizer) does not fit, and an exemption only
with its reason.
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from distill.config import ConfigError, resolve
from distill.methods import METHODS, get_method
from distill.teachers import CapabilityError, check_capabilities
from distill.train import train
from toy_env import VowelEnv

BASE = ["model=tiny", "env.id=ToyVowel-v0", "env.eval_id=ToyVowel-eval-v0", "steps=2", "questions_per_step=2",
        "group_size=2", "max_tokens_per_turn=8", "max_total_tokens=64", "eval.questions=1", "progress=false",
        "lr=1e-2", "threads=1", "teacher=teacher", "teacher.name=tiny"]
TEACHER = {"grpo": ["teacher=none"], "opsd": ["teacher=self"], "oprd": ["teacher.name=tiny:96x3"]}  # bridge: other width/depth
TEACHER["ovd"] = ["method.threshold=0"]  # the default row: every turn accepted (a random teacher would cut the
# one-turn toy env's only turn, leaving nothing of the student's to train): GRPO on F1
VARIANTS = [
    ("ovd", ["method.mode=reward", "method.granularity=turn"]),
    ("ovd", ["method.mode=reward", "method.grader.readout=digit"]),
    # every turn scores below 10: the teacher always takes over (one-turn env: from the first turn, so
    # only the teacher's tokens exist to train on)
    ("ovd", ["method.mode=replace", "method.threshold=10", "method.train_on_teacher_tokens=true"]),
    ("opd", ["method.form=topk"]),
    ("opd", ["method.form=jsd"]),
    ("opsd", ["method.form=k1"]),
    ("oprd", ["teacher=self", "method.opd_coef=1.0", "method.positions=4"]),
]
CASES = [(m, []) for m in METHODS] + VARIANTS


def run(tmp_path, method, extra):
    cfg, mcfg = resolve(BASE + [f"method={method}"] + (TEACHER.get(method, []) if not extra or method != "ovd" else []) + extra)
    out = tmp_path / "run"
    result = train(cfg, mcfg, out, resume=False)
    return out, result


# grpo stays in the fast tier; every other line of the table runs in the slow tier (CI runs both)
@pytest.mark.parametrize("method,extra", [pytest.param(m, e, marks=() if (m, e) == ("grpo", []) else pytest.mark.slow)
                                          for m, e in CASES], ids=[" ".join([m] + e) for m, e in CASES])
def test_two_steps_change_the_adapter_and_log_finite_metrics(tmp_path, method, extra):
    out, result = run(tmp_path, method, extra)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for x in lines:
        bad = {k: v for k, v in x.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
        assert x["trained_samples"] > 0
    weights = load_file(str(out / "checkpoints" / "step_000002" / "trainable.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) > 0  # LoRA B starts at exactly 0
    for f in ("config.yaml", "plot.png", "summary.json", "eval_before.json", "eval_after.json",
              "trajectories/step_000001.jsonl", "final_adapter/adapter_config.json"):
        assert (out / f).exists(), f
    assert list((out / "tensorboard").iterdir())
    rec = json.loads((out / "trajectories" / "step_000002.jsonl").read_text().splitlines()[0])
    assert {"question_id", "actions", "observations", "answer", "em", "f1", "step"} <= set(rec)
    if method == "ovd" and "method.mode=replace" in extra:
        assert lines[0]["replaced_trajectories"] == lines[0]["trajectories"] and lines[0]["teacher_tokens"] > 0


def test_replace_mode_masked_trains_only_student_tokens(tmp_path):
    from agents.hf_policy import TransformersPolicy
    from agents.models import tiny_random_model
    from agents.rollout import rollout
    from distill.methods.ovd import OVDConfig, prepare
    from distill.teachers.local import LocalTeacher
    from distill.train import Context
    import gymnasium as gym

    model, tok = tiny_random_model("small", seed=0)
    tmodel, _ = tiny_random_model("small", seed=1)
    policy, teacher = TransformersPolicy(model, tok), LocalTeacher(tmodel, tok, name="t")
    make_env = lambda: gym.make("WebQA-v0", max_turns=2)  # noqa: E731
    from agents.policy import SamplingParams

    sp = SamplingParams(temperature=1.0, seed=3)
    roll = lambda pol, opts, g=1: rollout(pol, make_env, opts, g, sp, 8, 128, seed=3, with_privileged=True)  # noqa: E731
    qid = make_env().unwrapped.questions[0]["id"]
    trajs = roll(policy, [{"question_id": qid}], 2)
    ctx = Context(policy, roll, None, {}, 2, 2, 3, 1, 2)
    sig = prepare(trajs, teacher, OVDConfig(mode="replace", threshold=10, train_on_teacher_tokens=False), ctx)  # cut at turn 1
    for old, new, mask in zip(trajs, sig.trajectories, sig.train_masks):
        assert new.info["replaced_from_turn"] == 0
        assert len(mask) == new.num_agent_tokens and sum(mask) == 0  # all agent tokens are the teacher's
    sig = prepare(trajs, teacher, OVDConfig(mode="replace", threshold=0), ctx)  # nothing below 0: no cut
    assert sig.trajectories[0] is trajs[0] and all(sum(m) == t.num_agent_tokens for m, t in zip(sig.train_masks, trajs))


# -- identities over the method table (METHODS.md, last section) -------------------------------
# Every method in the table is checked; a variant is one more line. A method that cannot hold an
# identity declares it below with the reason (and, where it can, the value it holds instead).
IDENTITY_VARIANTS = [
    ("opd", {"form": "topk"}),
    ("opd", {"form": "jsd"}),
    ("opd", {"form": "jsd", "beta": 0.0}),  # forward KL end
    ("opd", {"form": "jsd", "beta": 1.0}),  # reverse KL end
    ("opsd", {"form": "k1"}),
    ("oprd", {"positions": 2}),
    ("oprd", {"opd_coef": 1.0, "positions": 4}),
    ("ovd", {"mode": "reward"}),
    ("ovd", {"mode": "reward", "granularity": "turn"}),  # per-token rewards
    ("ovd", {"mode": "replace", "train_on_teacher_tokens": True}),
]
# ovd's default row accepts every turn (threshold 0): a random tiny teacher would otherwise replace
# every trajectory from its first turn, leaving no student token to check
IDENTITY_BASE = {"ovd": {"threshold": 0.0}}
IDENTITY_CASES = [(m, IDENTITY_BASE.get(m, {})) for m in METHODS] + IDENTITY_VARIANTS
IDS = [" ".join([m] + [f"{k}={v}" for k, v in o.items()]) for m, o in IDENTITY_CASES]


def _eopd_term_is_minus_log_topk_mass(r) -> None:
    """eopd at teacher == student: the pg term is 0 and the forward term is, per gated token,
    ``-log(mass of the teacher's top-k)``; its gradient is not zero either."""
    from distill.losses import entropy

    logits = r.mb.logits_N_V.detach().float()  # the teacher's too: the same function
    gate = (entropy(logits) >= r.cfg.tau).float()
    mass = torch.softmax(logits, -1).topk(r.cfg.topk, -1).values.sum(-1)
    want = r.cfg.alpha * float((gate * -torch.log(mass) * r.mb.weight_N).sum()) / r.mb.denominator
    assert r.metrics["gate_rate"] > 0 and want > 0
    assert float(r.loss) == pytest.approx(want, rel=1e-4), (float(r.loss), want)
    assert _max_grad(r.model, r.loss) > 1e-6  # the term moves the student's mass into the top-k


# method -> (reason, the check of what it holds instead, or None)
ZERO_SIGNAL_EXEMPT = {
    "eopd": ("the forward term KL(q~ || p) keeps the student's full-vocabulary normaliser (the paper's "
             "definition, METHODS.md): at teacher == student it is -log(top-k mass) > 0 and its gradient "
             "pulls the student's mass into the top-k", _eopd_term_is_minus_log_topk_mass),
    "ovd": ("verbal scores: no token-level teacher signal; the zero-signal identity is about token-level teachers", None),
}
OBSERVATION_EXEMPT: dict[str, str] = {}  # method -> reason; none: every method holds it
TWO_TURN_ENV = "ToyVowelTwoTurn-v0"


class TwoTurnVowelEnv(VowelEnv):
    """ToyVowel with a search-like first turn, so trajectories hold observation tokens (mask 0)
    between two agent turns."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.max_turns = 2

    def reset(self, *, seed=None, options=None):
        self._t = 0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        self._t += 1
        if self._t == 1:
            return "<information>Doc 1 (Title: Vowel) A vowel is a, e, i, o or u.</information>", 0.0, False, False, {}
        return super().step(action)


def _register_two_turn():
    import gymnasium as gym

    if TWO_TURN_ENV not in gym.registry:
        gym.register(TWO_TURN_ENV, entry_point=TwoTurnVowelEnv, kwargs={"split": "train"})


@pytest.fixture
def one_thread():
    """Tiny models on one intra-op thread: on a loaded 2-core machine two OpenMP threads made each
    tiny matmul ~1000x slower (10 ms instead of 10 us)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _method_step(method, overrides, teacher_kind, env_id, env_weight, monkeypatch=None) -> SimpleNamespace:
    """One micro-batch of ``method`` on a LoRA tiny student's own rollouts: its loss, config,
    micro-batch, samples, trajectories and the student's last-block outputs (``outs``, grads
    retained). ``teacher_kind``: ``self`` = the student with its adapters off (LoRA B = 0: the
    same function), ``other`` = another tiny model."""
    import gymnasium as gym
    from peft import LoraConfig, get_peft_model

    from agents.hf_policy import TransformersPolicy
    from agents.models import tiny_random_model
    from agents.policy import SamplingParams
    from agents.rollout import rollout
    from distill.forward import base_model
    from distill.teachers.local import LocalTeacher
    from distill.batches import student_hidden, build_samples, micro_batch
    from distill.train import Context

    model, tok = tiny_random_model("small", seed=0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    policy = TransformersPolicy(model, tok)
    m = get_method(method)
    mcfg = m.config(**{"env_weight": env_weight, **overrides})
    if method == "grpo":
        teacher = None
    elif teacher_kind == "self" or method == "opsd":
        teacher = LocalTeacher.self_teacher(model, tok)
    else:
        teacher = LocalTeacher(tiny_random_model("small", seed=1)[0], tok, name="other")
    if method == "opsd" and teacher_kind == "self" and monkeypatch is not None:
        # the same context too: no privileged block in the teacher's prompt
        monkeypatch.setattr("distill.methods.opsd.privileged_text", lambda prompt, priv, n: prompt)
    sp = SamplingParams(seed=1)
    roll = lambda pol, opts, g=1: rollout(pol, lambda: gym.make(env_id), opts, g, sp, 8, 96, seed=1, with_privileged=True)  # noqa: E731
    trajs = roll(policy, [{"question_id": "train-0"}], 2)
    ctx = Context(policy, roll, lambda seqs, ts, ls: student_hidden(model, policy.pad_id, seqs, ts, ls), {}, 2, 2, 1, 1, 2)
    sig = m.prepare(trajs, teacher, mcfg, ctx)
    trajs = sig.trajectories or trajs
    samples = build_samples(trajs, sig)
    den = sum(sum(s.weights) for s in samples)
    outs = []

    def keep(module, args, out):  # the decoder's last-block outputs, which reach only their own position
        for h in (out.last_hidden_state, (out.hidden_states or (None,))[-1]):
            if h is not None and h.requires_grad:
                h.retain_grad()
                outs.append(h)

    hook = base_model(model).get_decoder().register_forward_hook(keep)
    try:
        mb = micro_batch(model, samples, policy.pad_id, den, m.student_layers(mcfg, 2, 2), state=ctx.state, n_layers=(2, 2))
        outs_student = list(outs)  # the student's forward (teacher passes run without grad)
        loss, metrics = m.loss(mb, teacher, mcfg)
    finally:
        hook.remove()
    return SimpleNamespace(model=model, loss=loss, metrics=metrics, cfg=mcfg, mb=mb, outs=outs_student, samples=samples, trajs=trajs)


def test_identity_exemptions_are_declared_for_methods_in_the_table():
    reasons = [reason for reason, _ in ZERO_SIGNAL_EXEMPT.values()] + list(OBSERVATION_EXEMPT.values())
    assert set(ZERO_SIGNAL_EXEMPT) | set(OBSERVATION_EXEMPT) <= set(METHODS) and all(len(x) > 40 for x in reasons)
    assert {m for m, _ in IDENTITY_CASES} == set(METHODS)


def _max_grad(model, loss) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return max((float(g.abs().max()) for g in grads if g is not None), default=0.0)


@pytest.mark.parametrize("method,overrides", IDENTITY_CASES, ids=IDS)
def test_zero_signal_and_gradient_when_teacher_is_the_student(method, overrides, monkeypatch, one_thread):
    """env_weight=0 isolates the teacher term; same weights and same context: no loss, no gradient."""
    reason, holds_instead = ZERO_SIGNAL_EXEMPT.get(method, (None, None))
    if reason and holds_instead is None:
        pytest.skip(f"declared exemption: {reason}")
    r = _method_step(method, overrides, "self", "ToyVowel-v0", 0.0, monkeypatch)
    if holds_instead is not None:
        holds_instead(r)
        return
    loss, grad = float(r.loss), _max_grad(r.model, r.loss)
    assert abs(loss) < 1e-5 and grad < 1e-5, (loss, grad, r.metrics)
    if method == "oprd":
        assert r.metrics["oprd_mse"] < 1e-10


@pytest.mark.parametrize("method,overrides", IDENTITY_CASES, ids=IDS)
def test_observation_tokens_get_no_gradient(method, overrides, one_thread):
    """With a real signal (another teacher, env reward on), the loss reads the student's outputs
    only at rows predicting agent tokens: prompt, observation and padding rows get exactly 0."""
    if method in OBSERVATION_EXEMPT:
        pytest.skip(f"declared exemption: {OBSERVATION_EXEMPT[method]}")
    _register_two_turn()
    r = _method_step(method, overrides, "other", TWO_TURN_ENV, 1.0)
    assert r.outs, "no student forward was seen"
    assert all(0 in t.loss_mask for t in r.trajs)  # observation tokens are there to be checked
    allowed = torch.zeros(r.outs[0].shape[:2], dtype=torch.bool)
    for i, s in enumerate(r.samples):
        allowed[i, [t - 1 for t in s.targets]] = True
    trains = float(r.mb.weight_N.sum()) > 0  # ovd replace: a teacher's tokens may all be masked out
    for g in torch.autograd.grad(r.loss, r.outs, allow_unused=True):
        g = torch.zeros_like(r.outs[0]) if g is None else g
        assert float(g[~allowed].abs().max()) == 0.0, method
        if trains:
            assert float(g[allowed].abs().max()) > 0.0, (method, r.metrics)  # the check is not vacuous


def test_capabilities_are_checked_at_start_up():
    from agents.models import byte_tokenizer, tiny_random_model
    from distill.teachers.http import HttpTeacher
    from distill.teachers.local import LocalTeacher

    _, small_tok = tiny_random_model("small")
    http = HttpTeacher("http://127.0.0.1:9/v1")
    with pytest.raises(CapabilityError, match=r"\['logprobs'\].*logprobs=true"):
        check_capabilities("opd", get_method("opd").needs(get_method("opd").config()), http, small_tok)
    check_capabilities("ovd", get_method("ovd").needs(get_method("ovd").config()), http, small_tok)  # chat suffices: scores and acting
    other_model, other_tok = tiny_random_model("bytes")
    with pytest.raises(CapabilityError, match="tokenizer"):
        check_capabilities("opd", frozenset({"logprobs"}), LocalTeacher(other_model, other_tok), small_tok)
    with pytest.raises(CapabilityError, match="teacher=none"):
        check_capabilities("ovd", frozenset({"score"}), None, small_tok)


def test_bad_config_keys_are_named():
    with pytest.raises(ConfigError, match="^stepz: not a config key"):
        resolve(["stepz=3"])
    with pytest.raises(ConfigError, match="method.foo"):
        resolve(["method=ovd", "+method.foo=1"])
    with pytest.raises(ConfigError, match="^steps: an integer"):
        resolve(["steps=many"])
    with pytest.raises(ConfigError, match="ovd mode"):
        resolve(["method.mode=sometimes"])
    with pytest.raises(ConfigError, match="^method: one of .*ovd"):
        resolve(["method=nope"])
    cfg, mcfg = resolve(["method=opsd"])
    assert cfg.teacher.kind == "self" and mcfg.form == "jsd"
    cfg, mcfg = resolve(["method=grpo"])
    assert cfg.teacher.kind == "none"


def test_every_method_has_a_preset_and_a_docstring():
    from distill.config import CONF_DIR

    for name in METHODS:
        assert (CONF_DIR / "method" / f"{name}.yaml").exists()
        cfg, mcfg = resolve([f"method={name}"])
        assert mcfg.name == name and hasattr(mcfg, "env_weight")
        import importlib

        assert len(importlib.import_module(METHODS[name]).__doc__) > 200


def test_score_distribution_is_over_the_ten_digits_and_agrees_with_the_best_digit():
    from agents.models import tiny_random_model
    from agents.policy import chat_ids
    from distill.teachers.local import SCORE_PREFIX, LocalTeacher
    from distill.verbal import GraderConfig, grade, render

    model, tok = tiny_random_model("small", hidden_size=64, num_layers=2, seed=3)
    teacher = LocalTeacher(model, tok)
    head, digit_tok = teacher._digits()
    for d in range(10):  # "Score: <d>" encodes as the prompt suffix + that digit's token
        assert tok.encode(f"{SCORE_PREFIX} {d}", add_special_tokens=False) == head + [int(digit_tok[d])]
    chats = []
    for q in ("Who wrote Hamlet?", "What is the capital of France?", "When did WW2 end?"):
        chats.append(render(q, ["x"], ["<answer>y</answer>"], [""], "y"))
    probs = teacher.score_distribution(chats)
    assert len(probs) == 3 and all(len(p) == 10 and abs(sum(p) - 1) < 1e-5 for p in probs)
    prompts = [chat_ids(tok, c) + tok.encode(SCORE_PREFIX, add_special_tokens=False) for c in chats]
    assert teacher._best_digit(prompts) == [max(range(10), key=p.__getitem__) for p in probs]
    scores, m = grade(teacher, chats, GraderConfig(readout="expected", retries=0))
    assert scores == pytest.approx([sum(d * x for d, x in enumerate(p)) for p in probs]) and m["teacher_failed"] == 0


class _ZeroHiddenTeacher:
    """Teacher hidden states that are 0 at every requested position (D = 3)."""

    def hidden_states(self, seqs, targets, layers):
        return torch.zeros(len(layers), sum(len(t) for t in targets), 3)


def _oprd_loss(n_agent: list[int], k: int, mu: float, micro_batch_size: int) -> float:
    """oprd's loss over a step whose trajectories have ``n_agent`` agent tokens, the student's
    hidden state 1 in every dim (so every selected row's squared error is exactly 1)."""
    from agents.rollout import Trajectory
    from distill.methods import MicroBatch
    from distill.train import Context

    m = get_method("oprd")
    cfg = m.config(env_weight=0.0, positions=k, mu=mu, layers="1")
    trajs = [Trajectory(f"q{i}", "q", i, prompt_ids=[1, 2], completion_ids=[5] * n, loss_mask=[1] * n, reward=0.0)
             for i, n in enumerate(n_agent)]
    ctx = Context(None, None, None, {"bridge": None}, 1, 1, group_size=len(trajs))  # same shape: no bridge to fit
    sig = m.prepare(trajs, _ZeroHiddenTeacher(), cfg, ctx)
    total = 0.0
    for a in range(0, len(trajs), micro_batch_size):
        part = range(a, min(a + micro_batch_size, len(trajs)))
        targets = [[2 + j for j in range(n_agent[i])] for i in part]
        n = sum(map(len, targets))
        cat = lambda xs: torch.tensor([x for v in xs for x in v], dtype=torch.float32)  # noqa: E731
        mb = MicroBatch(seqs=[[1, 2] + [5] * n_agent[i] for i in part], targets=targets, logits_N_V=None,
                        logprobs_N=torch.zeros(n, requires_grad=True), hidden_L_N_D=torch.ones(1, n, 3, requires_grad=True),
                        seq_index_N=torch.zeros(n, dtype=torch.long), target_ids_N=torch.full((n,), 5),
                        advantages_N=torch.zeros(n), weight_N=torch.ones(n),
                        extras={key: cat([v[i] for i in part]) for key, v in sig.extras.items()},
                        denominator=float(sum(n_agent)), state=ctx.state, n_layers=(1, 1))
        loss, _ = m.loss(mb, _ZeroHiddenTeacher(), cfg)
        total += float(loss)
    return total


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_oprd_mu_scale_does_not_depend_on_unselected_agent_tokens(micro_batch_size, one_thread):
    # every selected row has squared error 1, so mean-over-selected-positions * mu is exactly mu,
    # however many earlier agent tokens the last-k selection leaves out (it used to be divided by them)
    for n_agent in ([4, 4, 4], [4, 10, 50], [2, 7, 30]):
        got = _oprd_loss(n_agent, k=4, mu=0.5, micro_batch_size=micro_batch_size)
        assert got == pytest.approx(0.5, rel=1e-6), (n_agent, got)
    assert _oprd_loss([3, 9], k=0, mu=2.0, micro_batch_size=1) == pytest.approx(2.0, rel=1e-6)  # k=0: all tokens


def test_opsd_teacher_prompt_keeps_the_tool_schemas(monkeypatch, one_thread):
    """Found in review: with ``env.protocol=tool_call`` the student's prompt carries the env's tool
    schemas, but opsd rebuilt the teacher's prompt without them, so teacher and student differed by
    more than the privileged block. With that block removed the two prompts must now be equal."""
    import gymnasium as gym

    from agents.hf_policy import TransformersPolicy
    from agents.models import tiny_random_model
    from agents.policy import SamplingParams
    from agents.rollout import rollout
    from distill.methods.opsd import teacher_sequences

    model, tok = tiny_random_model("student", seed=0, architecture="qwen2")  # Qwen's template renders tools
    policy = TransformersPolicy(model, tok)
    trajs = rollout(policy, lambda: gym.make("WebQA-v0", protocol="tool_call"), [{"index": 0}], 1,
                    SamplingParams(seed=1), 4, 2000, seed=1, with_privileged=True)
    t = trajs[0]
    assert t.info["tools"] and t.prompt_ids != policy.prompt_ids(t.info["prompt_text"])  # the schemas are in it
    monkeypatch.setattr("distill.methods.opsd.privileged_text", lambda prompt, priv, n: prompt)
    seqs, targets = teacher_sequences(trajs, policy, 2000)
    assert seqs[0] == list(t.prompt_ids) + list(t.completion_ids)
    assert targets[0] == [len(t.prompt_ids) + i for i, m in enumerate(t.loss_mask) if m]
