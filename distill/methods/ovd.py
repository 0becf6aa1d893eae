"""ovd: On-policy Verbal Distillation. A teacher reads the student's trajectory and says a digit
0-9; the digit decides which of the student's turns are kept, and the teacher acts on from there.

No teacher logits over the student's vocabulary and no shared tokenizer: any chat model, local
or behind an HTTP endpoint, can grade and act (``distill.teachers.act``).

From the paper (full text not in reach; the equations as two independent secondary readings
quote them), ``mode=replace``, the default:

* S3.2: the teacher's distribution over the ten score tokens gives the score S; here S is the
  expected digit (``grader.readout=expected``; ``distill.verbal``), or the parsed digit where the
  backend gives no log-probs.
* Eq. 5: a student (sub-)trajectory is accepted when S >= ``threshold``. v2: the student's turns
  are kept up to the first turn prefix scoring below the threshold; from that turn on the teacher
  acts in the same env (same question, retrieval and grading; the kept turns are replayed token
  for token) until the episode ends.
* Eqs. 2 and 4: the GRPO loss uses the outcome reward R(y) of the (mixed) trajectory only, F1
  for web QA (``env.reward=f1`` is the ovd training default; EM stays the evaluation metric).
  S never enters the loss.

Our choices: turn prefixes are scored lazily (turn k+1 only if turn k was accepted: the cut
needs no more); the teacher continues at ``teacher_temperature``; teacher tokens are marked
``SOURCE_TEACHER`` and train only with ``train_on_teacher_tokens`` (then as demonstrations
weighted by the trajectory's advantage, their PPO ratio taken against the learner's own detached
log-prob, i.e. ratio 1: the student never sampled them); a trajectory whose score cannot be read
or whose teacher request fails is dropped from the batch, never scored 0.

``mode=reward`` is the other reading, kept as an option: r = env_weight * env_reward +
(1 - env_weight) * S/9 per trajectory (``granularity=turn``: per turn prefix), then group
advantages.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from agents.policy import Completion
from agents.rollout import SOURCE_STUDENT, SOURCE_TEACHER
from distill.advantages import sample_advantages
from distill.methods import Method, MethodConfig, Signal
from distill.verbal import GraderConfig, gold_of, grade, render_solution_prefix, render_trajectory


@dataclass
class OVDConfig(MethodConfig):
    name: str = "ovd"
    mode: str = "replace"  # replace (the paper) | reward (S/9 mixed into the reward)
    threshold: float = 5.0  # replace: a turn prefix is accepted when S >= threshold (Eq. 5)
    train_on_teacher_tokens: bool = True
    # which teacher tokens train (with train_on_teacher_tokens): signed = every one, weighted by its
    # trajectory's advantage of either sign; positive = only where that advantage is > 0 (a
    # demonstration is imitated when it beat its group, never pushed down). docs/ovd.md says why.
    teacher_token_advantage: str = "signed"
    teacher_temperature: float = 0.7  # replace: sampling temperature of the teacher's continuation
    env_weight: float = 0.5  # reward mode only: weight of the env reward against S/9
    granularity: str = "trajectory"  # reward mode: trajectory | turn
    prefix: str = "auto"  # replace: what a prefix is: turn | step (a one-turn solution's paragraphs) | auto (step
    # where the env allows one turn, e.g. Math-v0; turn otherwise)
    max_steps: int = 8  # step prefixes: a solution's paragraphs merged into at most this many steps
    grader: dict = field(default_factory=dict)  # distill.verbal.GraderConfig fields (prompt, show_gold, readout, ...)

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_token_advantage not in ("signed", "positive"):
            raise ValueError(f"ovd teacher_token_advantage must be signed or positive, got {self.teacher_token_advantage!r}")
        if self.mode not in ("reward", "replace"):
            raise ValueError(f"ovd mode must be 'reward' or 'replace', got {self.mode!r}")
        if self.granularity not in ("trajectory", "turn"):
            raise ValueError(f"ovd granularity must be 'trajectory' or 'turn', got {self.granularity!r}")
        if not 0.0 <= self.env_weight <= 1.0:
            raise ValueError(f"env_weight must be in [0, 1], got {self.env_weight}")
        if self.prefix not in ("auto", "turn", "step"):
            raise ValueError(f"ovd prefix must be auto, turn or step, got {self.prefix!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 <= self.threshold <= 10.0:  # 0: always accept; 10: always replace
            raise ValueError(f"threshold must be in [0, 10], got {self.threshold}")
        grader_config(self)  # unknown grader keys fail here, by name

def grader_config(cfg: OVDConfig) -> GraderConfig:
    try:
        return GraderConfig(**cfg.grader)
    except TypeError as exc:
        raise ValueError(f"bad method.grader key: {exc}; known: {sorted(GraderConfig.__dataclass_fields__)}") from None


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"teacher_score_mean": float("nan")}
    m = sum(xs) / len(xs)
    return {"teacher_score_mean": m, "teacher_score_min": min(xs), "teacher_score_max": max(xs),
            "teacher_score_std": (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5}


def lazy_scores(n_prefixes: list[int], render, teacher, grader: GraderConfig, threshold: float | None, seed: int = 0):
    """Scores of each trajectory's prefixes 1..n_prefixes[i] (``render(i, k)``: the chat that asks
    for prefix k), prefix by prefix, and where to cut.

    With ``threshold`` set, prefix k+1 is scored only if prefix k was accepted, and ``cuts[i]`` is
    the number of prefixes accepted before the first one scoring below it (None: all accepted).
    Without it, every prefix is scored. A score that cannot be read marks the trajectory dropped.
    Returns (scores per trajectory per scored prefix, cuts, dropped set, request counts)."""
    n = len(n_prefixes)
    scores: list[list[float]] = [[] for _ in range(n)]
    cuts: list[int | None] = [None] * n
    dropped: set[int] = set()
    counts: dict[str, float] = {}
    alive = [i for i in range(n) if n_prefixes[i]]
    k = 1
    while alive:
        got, c = grade(teacher, [render(i, k) for i in alive], grader, seed=seed + 7919 * (k - 1))
        for key, v in c.items():
            counts[key] = counts.get(key, 0) + v
        nxt = []
        for i, sc in zip(alive, got):
            if sc is None:
                dropped.add(i)
                continue
            scores[i].append(sc)
            if threshold is not None and sc < threshold:
                cuts[i] = k - 1
            elif k < n_prefixes[i]:
                nxt.append(i)
        alive, k = nxt, k + 1
    return scores, cuts, dropped, counts


def score_prefixes(trajectories, teacher, grader: GraderConfig, threshold: float | None, seed: int = 0):
    """``lazy_scores`` over turn prefixes: ``cuts[i]`` is the first turn (0-based) scoring below
    the threshold."""
    return lazy_scores([len(t.actions) for t in trajectories], lambda i, k: render_trajectory(trajectories[i], k, grader),
                       teacher, grader, threshold, seed)


def split_steps(text: str, max_steps: int) -> list[str]:
    """A one-turn solution's steps: its paragraphs (split after each blank line, the separator kept
    with the step before it), merged evenly into at most ``max_steps``; ``"".join`` gives the text."""
    parts: list[str] = []
    for piece in re.split(r"(?<=\n\n)", text):
        if parts and not piece.strip():
            parts[-1] += piece
        elif piece:
            parts.append(piece)
    if len(parts) > max_steps:
        size = -(-len(parts) // max_steps)
        parts = ["".join(parts[k: k + size]) for k in range(0, len(parts), size)]
    return parts or [text]


def score_step_prefixes(trajectories, teacher, grader: GraderConfig, threshold: float, max_steps: int, seed: int = 0):
    """``lazy_scores`` for one-turn trajectories, over the steps of their one answer (OVD v2 at
    step granularity): the last prefix is the whole trajectory, scored as a finished one.
    ``cuts[i]`` = how many steps to keep. Also returns the steps."""
    t = trajectories
    steps = [split_steps(x.actions[0], max_steps) if x.actions else [] for x in t]

    def render(i: int, k: int):
        if k < len(steps[i]):
            return render_solution_prefix(t[i].question, gold_of(t[i]), "".join(steps[i][:k]), grader)
        return render_trajectory(t[i], None, grader)

    return (*lazy_scores([len(x) for x in steps], render, teacher, grader, threshold, seed), steps)


def kept_tokens(student, ids, text_prefix: str) -> int:
    """The fewest of a turn's ``ids`` whose decoded text covers ``text_prefix``."""
    if not text_prefix:
        return 0
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(student.decode(ids[:mid])) >= len(text_prefix):
            hi = mid
        else:
            lo = mid + 1
    return lo


def continue_with_teacher(trajectories, cuts: dict[int, int], actor, student, roll, temperature: float | None = None,
                          partial: dict[int, int] | None = None):
    """The mixed trajectories: for each ``i -> cut`` the student's first ``cut`` turns replayed
    token for token, then ``actor`` acting until the episode ends (``roll(policy, reset_options)``
    runs the one rollout loop). ``partial[i] = m``: the first m tokens of turn ``cuts[i]`` are the
    student's too, and the teacher continues that turn from them. Returns {i: mixed trajectory};
    a failed teacher request marks it ``info["teacher_failed"]``."""
    from distill.teachers.act import PrefixPolicy

    if not cuts:
        return {}
    order = sorted(cuts)
    forced, heads = {}, {}
    for e, i in enumerate(order):
        t = trajectories[i]
        forced[e] = [Completion(t.completion_ids[a:b], t.logprobs[a:b], t.actions[k], "stop")
                     for k, (a, b) in enumerate(t.info["turn_spans"][: cuts[i]])]
        m = (partial or {}).get(i, 0)
        if m:
            a = t.info["turn_spans"][cuts[i]][0]
            ids = t.completion_ids[a: a + m]
            heads[e] = Completion(ids, t.logprobs[a: a + m], student.decode(ids), "partial")
    policy = PrefixPolicy(student, actor, forced, heads=heads, **({} if temperature is None else {"temperature": temperature}))
    mixed = roll(policy, [{"question_id": trajectories[i].question_id} for i in order])
    out = {}
    for e, i in enumerate(order):
        nt = mixed[e]
        nt.sample_index = trajectories[i].sample_index
        nt.info["replaced_from_turn"] = cuts[i]
        nt.info["teacher_failed"] = e in getattr(actor, "failed", ())
        out[i] = nt
    return out


def prepare(trajectories, teacher, cfg: OVDConfig, ctx) -> Signal:
    if cfg.mode == "replace":
        return _prepare_replace(trajectories, teacher, cfg, ctx)
    grader, w = grader_config(cfg), cfg.env_weight
    if cfg.granularity == "trajectory":  # one score of the whole trajectory
        got, m = grade(teacher, [render_trajectory(t, None, grader) for t in trajectories], grader, seed=ctx.seed)
        rewards = [None if s is None else w * t.reward + (1 - w) * s / 9 for t, s in zip(trajectories, got)]
        adv = sample_advantages(rewards, [t.num_agent_tokens for t in trajectories], ctx.group_size, cfg.scale_advantages)
        return Signal(advantages=adv, metrics={**m, **_stats([s for s in got if s is not None]),
                                               "dropped": sum(r is None for r in rewards)})
    scores, _, dropped, m = score_prefixes(trajectories, teacher, grader, None, ctx.seed)
    rewards, token_rewards = [], []
    for i, (t, ss) in enumerate(zip(trajectories, scores)):
        if i in dropped or not ss:
            rewards.append(None)
            token_rewards.append([])
            continue
        turn_r = [w * t.reward + (1 - w) * s / 9 for s in ss]
        rewards.append(sum(turn_r) / len(turn_r))
        token_rewards.append([turn_r[k] for k, (a, b) in enumerate(t.info["turn_spans"]) for _ in range(b - a)])
    flat = [x for ss in scores for x in ss]
    # each turn's tokens: (its reward - the group's mean trajectory reward) / the group's std
    adv = sample_advantages(rewards, [t.num_agent_tokens for t in trajectories], ctx.group_size, cfg.scale_advantages,
                            token_rewards=token_rewards)
    return Signal(advantages=adv,
                  metrics={**m, **_stats(flat), "dropped": sum(r is None for r in rewards)})


def _prepare_replace(trajectories, teacher, cfg: OVDConfig, ctx) -> Signal:
    from distill.teachers.act import teacher_actor

    grader = grader_config(cfg)
    t0 = time.perf_counter()
    if use_steps(trajectories, cfg):
        scores, kept, dropped, m, steps = score_step_prefixes(trajectories, teacher, grader, cfg.threshold, cfg.max_steps, ctx.seed)
        cut_at = {i: 0 for i, c in enumerate(kept) if c is not None and i not in dropped}  # the one turn, partly kept
        partial = {i: kept_tokens(ctx.policy, trajectories[i].completion_ids[slice(*trajectories[i].info["turn_spans"][0])],
                                  "".join(steps[i][: kept[i]])) for i in cut_at}
        cuts = kept
        m["kept_steps"] = sum(kept[i] for i in cut_at)
    else:
        scores, cuts, dropped, m = score_prefixes(trajectories, teacher, grader, cfg.threshold, ctx.seed)
        cut_at, partial = {i: c for i, c in enumerate(cuts) if c is not None and i not in dropped}, {}
    t1 = time.perf_counter()
    actor = teacher_actor(teacher, ctx.policy, ctx.policy.tokenizer)
    mixed = continue_with_teacher(trajectories, cut_at, actor, ctx.policy, ctx.rollout, cfg.teacher_temperature, partial)
    m["seconds_scoring"], m["seconds_continuation"] = t1 - t0, time.perf_counter() - t1  # the teacher phase, split
    out = [mixed.get(i, t) for i, t in enumerate(trajectories)]
    rewards: list[float | None] = []
    masks, sources, teacher_tokens, replaced, teacher_turns = [], [], 0, 0, 0
    for i, t in enumerate(out):
        failed = i in dropped or t.info.get("teacher_failed")
        rewards.append(None if failed else float(t.reward))  # Eq. 4: the outcome reward only
        src = [s for s, lm in zip(t.sources, t.loss_mask) if lm]
        sources.append(src)
        masks.append([1 if (s == SOURCE_STUDENT or cfg.train_on_teacher_tokens) else 0 for s in src])
        if i in cut_at:
            teacher_tokens += sum(s != SOURCE_STUDENT for s in src)
            replaced += len(trajectories[i].actions) - cut_at[i]
            teacher_turns += len(t.actions) - cut_at[i]
    scored = [i for i in range(len(trajectories)) if i not in dropped and scores[i]]
    flat = [x for ss in scores for x in ss]
    # Eq. 4: GRPO advantages of the mixed trajectories' outcome rewards
    adv = sample_advantages(rewards, [t.num_agent_tokens for t in out], ctx.group_size, cfg.scale_advantages)
    if cfg.teacher_token_advantage == "positive":
        masks = positive_teacher_masks(masks, sources, adv)
    return Signal(advantages=adv, trajectories=out, train_masks=masks, metrics={
        **m, **_stats(flat), "dropped": sum(r is None for r in rewards),
        "accept_rate": sum(cuts[i] is None for i in scored) / max(len(scored), 1),
        "replaced_trajectories": len(cut_at), "replaced_turns": replaced, "teacher_turns": teacher_turns,
        "teacher_tokens": teacher_tokens})


def positive_teacher_masks(masks, sources, advantages):
    """Train masks with each teacher token (``SOURCE_TEACHER``) kept only where its advantage is
    > 0. Our choice, not the paper's (``teacher_token_advantage=positive``): with the teacher
    acting from the first turn (accept rate near 0) ovd trains the student almost only on the
    teacher's tokens, which it did not sample; a negative advantage then pushes down tokens the
    student gives little probability (``-A grad log pi`` does not vanish as pi -> 0, while the
    positive side saturates), and the token mean weights long failing continuations most."""
    out = []
    for m, src, a in zip(masks, sources, advantages):
        if a is None:
            out.append(m)
            continue
        out.append([0 if (s == SOURCE_TEACHER and x <= 0) else keep for keep, s, x in zip(m, src, a)])
    return out


def use_steps(trajectories, cfg: OVDConfig) -> bool:
    """Step prefixes where asked, or (``prefix=auto``) where the env allows one turn."""
    if cfg.prefix != "auto":
        return cfg.prefix == "step"
    return bool(trajectories) and all(t.info.get("max_turns") == 1 for t in trajectories)


def needs(cfg: OVDConfig) -> frozenset[str]:
    return frozenset({"score", "act"}) if cfg.mode == "replace" else frozenset({"score"})


def loss(mb, teacher, cfg: OVDConfig):
    from distill.methods import pg_term

    return pg_term(mb, cfg)


METHOD = Method("ovd", OVDConfig, needs=needs, prepare=prepare, loss=loss, default_reward="f1",
                advantage_only=lambda cfg: cfg.kl_beta == 0)  # F1: OVD Eq. 2
