"""opsd: on-policy self-distillation - the same model, told the answer, teaches itself.

The teacher is the student's initial policy (``teacher=self``: the LoRA adapters disabled) with
privileged information in its prompt: the gold answers and gold supporting passages from
``env.unwrapped.privileged()`` (Math-v0: the reference answer and solution, the OPSD paper's
privileged context), placed before the normal prompt. It scores the student's own
tokens: the teacher sequence is ``privileged prompt + the same completion ids``. Loss:
``form=jsd`` (default) full-vocabulary generalised JSD with ``beta=0.5`` per agent token (GKD/TRL
convention, ``losses.generalized_jsd``: 0 forward KL, 1 reverse KL, 0.5 symmetric; teacher rows
per micro-batch), or ``form=k1`` the sampled-token advantage as in opd. The env
reward enters through ``env_weight`` (default 0: pure self-distillation).
"""
from __future__ import annotations

from dataclasses import dataclass

from distill.losses import generalized_jsd, masked_mean
from distill.methods import Method, MethodConfig, Signal, as_mean, env_signal, pg_term


@dataclass
class OPSDConfig(MethodConfig):
    name: str = "opsd"
    env_weight: float = 0.0
    form: str = "jsd"  # jsd | k1
    beta: float = 0.5  # jsd only: 0 forward KL(q||p), 1 reverse KL(p||q) (GKD/TRL)
    kl_coef: float = 1.0
    privileged_chars: int = 2000  # characters of gold passages put in the teacher's prompt

    def __post_init__(self):
        super().__post_init__()
        if self.form not in ("jsd", "k1"):
            raise ValueError(f"opsd form must be jsd or k1, got {self.form!r}")


def privileged_text(prompt: str, priv: dict, max_chars: int) -> str:
    answers = " | ".join(map(str, priv.get("answers", [])))
    passages = "\n".join(f"- {p}" for p in priv.get("supporting_passages", []))[:max_chars]
    block = f"(Privileged reference, not visible to the agent.) The correct answer is: {answers}\n"
    if priv.get("solution"):  # Math-v0: the reference solution (OPSD's privileged context on math)
        block += f"Reference solution:\n{priv['solution'][:max_chars]}\n"
    if passages:
        block += f"Supporting passages:\n{passages}\n"
    return block + "\n" + prompt


def teacher_sequences(trajectories, policy, max_chars: int) -> tuple[list[list[int]], list[list[int]]]:
    seqs, targets = [], []
    for t in trajectories:
        priv = t.info.get("privileged")
        if priv is None:
            raise RuntimeError("opsd needs trajectories rolled out with privileged information (with_privileged=True)")
        # the same tool schemas as the student's prompt (protocol=tool_call): only the block differs
        pids = policy.prompt_ids(privileged_text(t.info["prompt_text"], priv, max_chars), tools=t.info.get("tools"))
        seqs.append(list(pids) + list(t.completion_ids))
        targets.append([len(pids) + i for i, m in enumerate(t.loss_mask) if m])
    return seqs, targets


def needs(cfg) -> frozenset[str]:
    return frozenset({"distribution"}) if cfg.form == "jsd" else frozenset({"logprobs"})


def prepare(trajectories, teacher, cfg, ctx) -> Signal:
    seqs, targets = teacher_sequences(trajectories, ctx.policy, cfg.privileged_chars)
    lq, failed = None, set()
    if cfg.form == "k1":
        lq = teacher.logprobs(seqs, targets)
        failed = {i for i, x in enumerate(lq) if x is None}
    sig = env_signal(trajectories, cfg, ctx, failed)
    sig.teacher_seqs, sig.teacher_targets = seqs, targets
    if lq is not None:
        sig.extras["teacher_logprobs"] = lq
    return sig


def loss(mb, teacher, cfg):
    if cfg.form == "k1":
        k1 = mb.logprobs_N.detach() - mb.extras["teacher_logprobs"]
        total, m = pg_term(mb, cfg, mb.advantages_N - cfg.kl_coef * k1)
        m["kl_k1"] = float(masked_mean(k1, mb.weight_N))
        return total, m
    pg, m = pg_term(mb, cfg)
    t_logits = teacher.distribution(mb.teacher_seqs, mb.teacher_targets)
    jsd = masked_mean(generalized_jsd(mb.logits_N_V, t_logits, cfg.beta), mb.weight_N, mb.denominator)
    m["jsd"] = as_mean(jsd, mb)
    return pg + cfg.kl_coef * jsd, m


METHOD = Method("opsd", OPSDConfig, needs=needs, prepare=prepare, loss=loss, default_teacher="self")
