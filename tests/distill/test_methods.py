"""Every method in the table: a 2-step run on a tiny random model changes the adapter and logs
finite metrics; method-level identities (no signal when teacher equals student); capability checks.

A new method is tested by adding its table line; give it a teacher here only if the default
(a second tiny random model with the student's tokenizer) does not fit.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from distill.config import ConfigError, resolve
from distill.methods import METHODS, get_method
from distill.teachers import CapabilityError, check_capabilities
from distill.train import train

BASE = ["model=tiny", "env.id=ToyVowel-v0", "env.eval_id=ToyVowel-eval-v0", "steps=2", "questions_per_step=2",
        "group_size=2", "max_tokens_per_turn=8", "max_total_tokens=64", "eval.questions=1", "progress=false",
        "lr=1e-2", "threads=1", "teacher=teacher", "teacher.name=tiny"]
TEACHER = {"grpo": ["teacher=none"], "opsd": ["teacher=self"], "oprd": ["teacher.name=tiny:96x3"]}  # bridge: other width/depth
VARIANTS = [
    ("ovd", ["method.granularity=turn"]),
    ("ovd", ["method.score=expected"]),
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
    cfg, mcfg = resolve(BASE + [f"method={method}"] + TEACHER.get(method, []) + extra)
    out = tmp_path / "run"
    result = train(cfg, mcfg, out, resume=False)
    return out, result


@pytest.mark.parametrize("method,extra", CASES, ids=[" ".join([m] + e) for m, e in CASES])
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
        assert lines[0]["replaced"] == lines[0]["trajectories"]


def test_replace_mode_trains_only_student_tokens(tmp_path):
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
    ctx = Context(policy, roll, None, {}, 2, 2, 3, 1)
    sig = prepare(trajs, teacher, OVDConfig(mode="replace", threshold=10), ctx)  # cut at the first turn
    for old, new, mask in zip(trajs, sig.trajectories, sig.train_masks):
        assert new.info["replaced_from_turn"] == 0
        assert len(mask) == new.num_agent_tokens and sum(mask) == 0  # all agent tokens are the teacher's
    sig = prepare(trajs, teacher, OVDConfig(mode="replace", threshold=0), ctx)  # nothing below 0: no cut
    assert sig.trajectories[0] is trajs[0] and all(sum(m) == t.num_agent_tokens for m, t in zip(sig.train_masks, trajs))


def _self_signal(form, method="opd"):
    """Loss gradient of a token-level method whose teacher is the student itself (same weights, context)."""
    import gymnasium as gym
    from peft import LoraConfig, get_peft_model

    from agents.hf_policy import TransformersPolicy
    from agents.models import tiny_random_model
    from agents.policy import SamplingParams
    from agents.rollout import rollout
    from distill.teachers.local import LocalTeacher
    from distill.train import Context, _student_hidden, build_samples, micro_batch

    model, tok = tiny_random_model("small", seed=0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    policy = TransformersPolicy(model, tok)
    teacher = LocalTeacher.self_teacher(model, tok)
    trajs = rollout(policy, lambda: gym.make("ToyVowel-v0"), [{"question_id": "train-0"}], 2, SamplingParams(seed=1), 8, 64, seed=1)
    m = get_method(method)
    mcfg = m.config(env_weight=0.0, form=form) if method == "opd" else m.config(env_weight=0.0)
    ctx = Context(policy, None, lambda seqs, ts, ls: _student_hidden(model, policy.pad_id, seqs, ts, ls), {}, 2, 2, 1, 1)
    sig = m.prepare(trajs, teacher, mcfg, ctx)
    samples = build_samples(trajs, sig, 2, True)
    den = sum(sum(s.weights) for s in samples)
    layers = m.student_layers(mcfg, 2, 2)
    mb = micro_batch(model, samples, policy.pad_id, den, layers, state=ctx.state, n_layers=(2, 2))
    loss, metrics = m.loss(mb, teacher, mcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(loss), max(float(g.abs().max()) for g in grads if g is not None), metrics


@pytest.mark.parametrize("form", ["k1", "topk", "jsd"])
def test_opd_signal_is_zero_when_teacher_is_the_student(form):
    loss, grad, metrics = _self_signal(form)
    assert abs(loss) < 1e-5 and grad < 1e-5, (loss, grad, metrics)


def test_oprd_signal_is_zero_when_teacher_is_the_student():
    loss, grad, metrics = _self_signal(None, "oprd")
    assert metrics["oprd_mse"] < 1e-10 and grad < 1e-6


def test_capabilities_are_checked_at_start_up():
    from agents.models import byte_tokenizer, tiny_random_model
    from distill.teachers.http import HttpTeacher
    from distill.teachers.local import LocalTeacher

    _, small_tok = tiny_random_model("small")
    http = HttpTeacher("http://127.0.0.1:9/v1")
    with pytest.raises(CapabilityError, match=r"\['logprobs'\].*logprobs=true"):
        check_capabilities("opd", get_method("opd").needs(get_method("opd").config()), http, small_tok)
    check_capabilities("ovd", get_method("ovd").needs(get_method("ovd").config()), http, small_tok)  # scores suffice
    with pytest.raises(CapabilityError, match="score_distribution"):  # a remote chat reply has no digit distribution
        check_capabilities("ovd", get_method("ovd").needs(get_method("ovd").config(score="expected")), http, small_tok)
    other_model, other_tok = tiny_random_model("bytes")
    with pytest.raises(CapabilityError, match="tokenizer"):
        check_capabilities("opd", frozenset({"logprobs"}), LocalTeacher(other_model, other_tok), small_tok)
    with pytest.raises(CapabilityError, match="teacher=none"):
        check_capabilities("ovd", frozenset({"score"}), None, small_tok)
    assert byte_tokenizer() is not None


def test_bad_config_keys_are_named():
    with pytest.raises(ConfigError, match="'stepz'"):
        resolve(["stepz=3"])
    with pytest.raises(ConfigError, match="method.foo"):
        resolve(["method=ovd", "+method.foo=1"])
    with pytest.raises(ConfigError, match="'steps'"):
        resolve(["steps=many"])
    with pytest.raises(ConfigError, match="ovd mode"):
        resolve(["method.mode=sometimes"])
    with pytest.raises(ConfigError, match="method/nope"):
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
    from distill.methods.ovd import render, score_all
    from distill.teachers.local import SCORE_PREFIX, LocalTeacher

    model, tok = tiny_random_model("small", hidden_size=64, num_layers=2, seed=3)
    teacher = LocalTeacher(model, tok)
    head, digit_tok = teacher._digits()
    for d in range(10):  # "Score: <d>" encodes as the prompt suffix + that digit's token
        assert tok.encode(f"{SCORE_PREFIX} {d}", add_special_tokens=False) == head + [int(digit_tok[d])]
    chats = []
    for q in ("Who wrote Hamlet?", "What is the capital of France?", "When did WW2 end?"):
        tr = type("T", (), {"question": q, "info": {"gold_answers": ["x"]}, "actions": ["<answer>y</answer>"],
                            "observations": [""], "answer": "y"})()
        chats.append(render(tr))
    probs = teacher.score_distribution(chats)
    assert len(probs) == 3 and all(len(p) == 10 and abs(sum(p) - 1) < 1e-5 for p in probs)
    prompts = [chat_ids(tok, c) + tok.encode(SCORE_PREFIX, add_special_tokens=False) for c in chats]
    assert teacher._best_digit(prompts) == [max(range(10), key=p.__getitem__) for p in probs]
    scores, m = score_all(teacher, chats, retries=0, expected=True)
    assert scores == [sum(d * x for d, x in enumerate(p)) for p in probs] and m["teacher_failed"] == 0
