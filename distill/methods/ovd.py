"""ovd: On-policy Verbal Distillation - the teacher reads the trajectory and says a digit 0-9.

No teacher logits and no shared tokenizer: any chat model, local or behind an HTTP endpoint,
can teach, and the training process holds no teacher weights when the teacher is remote.

How this departs from (or fills in) the paper, whose full text was not available:

* ``mode=reward`` (default): ``r = env_weight * env_reward + (1 - env_weight) * s / 9`` per
  trajectory, then GRPO group advantages. ``granularity=turn`` scores every turn prefix and
  gives each turn's tokens ``env_weight * env_reward + (1 - env_weight) * s_turn / 9``,
  normalised with the group statistics of the trajectory rewards (trajectory reward = mean
  over its turns).
* ``mode=replace``: score every turn prefix; at the first turn scoring below ``threshold`` cut
  the trajectory and let the teacher act on from there in the same env (the student's kept
  turns are replayed token for token through the one rollout loop). The mixed trajectory's
  reward is ``env_weight * env_reward + (1 - env_weight) * mean(kept scores) / 9``; only the
  student's tokens train unless ``train_on_teacher_tokens``. Needs a teacher that can act and
  shares the student's tokenizer.
* The prompt states the scale with anchors (0, 3, 6, 9) and, by default (``show_gold``), the
  gold answers: the teacher is privileged. The reply must contain ``Score: <digit>``.
  Unparseable replies and failed requests are retried (sampling), then counted and the
  trajectory is dropped from the batch - never scored 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from agents.policy import Completion
from distill.methods import Method, MethodConfig, Signal

SYSTEM = "You are a strict grader of search agents. You reply with one line: Score: <digit>."

RUBRIC = (
    "Rate how well the agent did, on a scale from 0 to 9:\n"
    "0 = no answer, or the actions are malformed or nonsense;\n"
    "3 = wrong answer, but the searches were relevant;\n"
    "6 = partly right (close answer, or right answer without using the evidence found);\n"
    "9 = correct answer, supported by the retrieved text, with few and well-aimed searches.\n"
    "Use the digits in between for cases in between. Reply with exactly one line: Score: <digit>"
)

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*([0-9])(?![0-9])", re.IGNORECASE)
_BARE = re.compile(r"\s*\**([0-9])\**\s*(?:/\s*9)?\s*[.!]?\s*")


@dataclass
class OVDConfig(MethodConfig):
    name: str = "ovd"
    env_weight: float = 0.5
    mode: str = "reward"  # reward | replace
    granularity: str = "trajectory"  # trajectory | turn (mode=reward)
    show_gold: bool = True
    # digit: the teacher's reply, one digit (any chat endpoint). expected: the mean digit under
    # the teacher's distribution over 0-9 after "Score:" (a local teacher; a graded score that
    # separates trajectories a greedy digit ties, e.g. a weak teacher answering 6 to everything)
    score: str = "digit"
    threshold: int = 5  # mode=replace: cut at the first turn scoring below this
    train_on_teacher_tokens: bool = False
    score_retries: int = 2  # re-asks (sampling) for unparseable or failed replies
    obs_chars: int = 600  # characters of each observation shown to the teacher

    def __post_init__(self):
        if self.mode not in ("reward", "replace"):
            raise ValueError(f"ovd mode must be 'reward' or 'replace', got {self.mode!r}")
        if self.score not in ("digit", "expected"):
            raise ValueError(f"ovd score must be 'digit' or 'expected', got {self.score!r}")
        if self.granularity not in ("trajectory", "turn"):
            raise ValueError(f"ovd granularity must be 'trajectory' or 'turn', got {self.granularity!r}")
        if not 0.0 <= self.env_weight <= 1.0:
            raise ValueError(f"env_weight must be in [0, 1], got {self.env_weight}")


def parse_score(reply: str | None) -> int | None:
    """The digit in ``Score: 7`` (also ``score=7``, ``**7**``, a bare ``7`` or ``7/9``), else None."""
    if reply is None:
        return None
    m = _SCORE.search(reply)
    if m:
        return int(m.group(1))
    m = _BARE.fullmatch(reply)
    return int(m.group(1)) if m else None


def render(tr, upto_turn: int | None = None, show_gold: bool = True, obs_chars: int = 600) -> list[dict]:
    """Chat messages asking the teacher to grade ``tr`` (its first ``upto_turn`` turns if given)."""
    n = len(tr.actions) if upto_turn is None else upto_turn
    lines = [f"Question: {tr.question}"]
    gold = (tr.info.get("privileged") or {}).get("answers") or tr.info.get("gold_answers")
    if show_gold and gold:
        lines.append(f"Gold answer(s): {' | '.join(map(str, gold))}")
    lines.append("")
    lines.append("The agent's trajectory:" if upto_turn is None else f"The agent's first {n} turn(s):")
    for k in range(n):
        lines.append(f"[turn {k + 1}, agent] {tr.actions[k].strip()}")
        if k < len(tr.observations) and tr.observations[k]:
            obs = tr.observations[k].strip()
            lines.append(f"[turn {k + 1}, environment] {obs[:obs_chars]}{' ...' if len(obs) > obs_chars else ''}")
    if upto_turn is None:
        lines.append(f"Final answer: {tr.answer if tr.answer is not None else '(none)'}")
    lines += ["", RUBRIC if upto_turn is None else RUBRIC.replace("how well the agent did", "how well the agent is doing so far")]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def score_all(teacher, messages: list[list[dict]], retries: int, seed: int = 0, expected: bool = False) -> tuple[list, dict]:
    if expected:  # one forward pass per chat, nothing to parse
        probs = teacher.score_distribution(messages) if messages else []
        return [sum(d * p for d, p in enumerate(ps)) for ps in probs], {"teacher_requests": len(messages), "teacher_failed": 0,
                                                                         "teacher_unparseable": 0}
    replies = teacher.score(messages) if messages else []
    failed = sum(r is None for r in replies)
    scores = [parse_score(r) for r in replies]
    unparseable = sum(r is not None and s is None for r, s in zip(replies, scores))
    for attempt in range(1, retries + 1):
        todo = [i for i, s in enumerate(scores) if s is None]
        if not todo:
            break
        again = teacher.score([messages[i] for i in todo], sample=True, seed=seed + attempt)
        for i, r in zip(todo, again):
            failed += r is None
            s = parse_score(r)
            unparseable += r is not None and s is None
            scores[i] = s
    return scores, {"teacher_requests": len(messages), "teacher_failed": failed, "teacher_unparseable": unparseable}


def score_turns(trajectories, teacher, cfg: OVDConfig, seed: int) -> tuple[list[list[int | None]], list[int | None], dict]:
    """Scores of every turn prefix: (per trajectory per turn, flat, request metrics)."""
    index, msgs = [], []
    for i, t in enumerate(trajectories):
        for k in range(len(t.actions)):
            index.append((i, k))
            msgs.append(render(t, k + 1, cfg.show_gold, cfg.obs_chars))
    flat, m = score_all(teacher, msgs, cfg.score_retries, seed=seed, expected=cfg.score == "expected")
    per: list[list[int | None]] = [[None] * len(t.actions) for t in trajectories]
    for (i, k), s in zip(index, flat):
        per[i][k] = s
    return per, flat, m


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"teacher_score_mean": float("nan")}
    m = sum(xs) / len(xs)
    return {"teacher_score_mean": m, "teacher_score_min": min(xs), "teacher_score_max": max(xs),
            "teacher_score_std": (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5}


def prepare(trajectories, teacher, cfg: OVDConfig, ctx) -> Signal:
    if cfg.mode == "replace":
        return _prepare_replace(trajectories, teacher, cfg, ctx)
    w = cfg.env_weight
    if cfg.granularity == "trajectory":
        msgs = [render(t, None, cfg.show_gold, cfg.obs_chars) for t in trajectories]
        scores, m = score_all(teacher, msgs, cfg.score_retries, seed=ctx.seed, expected=cfg.score == "expected")
        rewards = [None if s is None else w * t.reward + (1 - w) * s / 9 for t, s in zip(trajectories, scores)]
        kept = [s for s in scores if s is not None]
        return Signal(rewards=rewards, metrics={**m, **_stats(kept), "dropped": sum(s is None for s in scores)})
    # per-turn scores
    per, flat, m = score_turns(trajectories, teacher, cfg, ctx.seed)
    rewards, token_rewards = [], []
    for t, ss in zip(trajectories, per):
        if not ss or any(s is None for s in ss):
            rewards.append(None)
            token_rewards.append([])
            continue
        turn_r = [w * t.reward + (1 - w) * s / 9 for s in ss]
        rewards.append(sum(turn_r) / len(turn_r))
        token_rewards.append([turn_r[k] for k, (a, b) in enumerate(t.info["turn_spans"]) for _ in range(b - a)])
    kept = [s for s in flat if s is not None]
    return Signal(rewards=rewards, token_rewards=token_rewards,
                  metrics={**m, **_stats(kept), "dropped": sum(r is None for r in rewards)})


class PrefixPolicy:
    """Replays each episode's first turns token for token, then lets ``inner`` act."""

    def __init__(self, student, inner, forced: dict[int, list[Completion]]):
        self.student, self.inner, self.forced = student, inner, forced
        self.turns: dict[int, int] = {}

    def encode(self, text):
        return self.student.encode(text)

    def decode(self, ids):
        return self.student.decode(ids)

    def prompt_ids(self, user_text, tools=None):
        return self.student.prompt_ids(user_text, tools=tools)

    def generate(self, prompts, sampling, contexts=None):
        out: list[Completion | None] = [None] * len(prompts)
        delegate = []
        for i, ctx in enumerate(contexts):
            ep = ctx["episode"]
            k = self.turns.get(ep, 0)
            self.turns[ep] = k + 1
            if k < len(self.forced.get(ep, [])):
                out[i] = self.forced[ep][k]
            else:
                delegate.append(i)
        if delegate:
            for i, c in zip(delegate, self.inner.generate([prompts[i] for i in delegate], sampling)):
                out[i] = c
        return out


def _prepare_replace(trajectories, teacher, cfg: OVDConfig, ctx) -> Signal:
    w = cfg.env_weight
    per, flat, m = score_turns(trajectories, teacher, cfg, ctx.seed)
    out_trajs = list(trajectories)
    rewards: list[float | None] = [None] * len(trajectories)
    masks = [[1] * t.num_agent_tokens for t in trajectories]
    cuts: dict[int, int] = {}
    for i, (t, ss) in enumerate(zip(trajectories, per)):
        if any(s is None for s in ss):
            continue  # dropped
        low = [k for k, s in enumerate(ss) if s < cfg.threshold]
        if low:
            cuts[i] = low[0]
        else:
            rewards[i] = w * t.reward + (1 - w) * (sum(ss) / len(ss)) / 9
    if cuts:
        order = sorted(cuts)
        forced = {}
        for e, i in enumerate(order):
            t = trajectories[i]
            forced[e] = [Completion(t.completion_ids[a:b], t.logprobs[a:b], t.actions[k], "stop")
                         for k, (a, b) in enumerate(t.info["turn_spans"][: cuts[i]])]
        policy = PrefixPolicy(ctx.policy, teacher.policy(), forced)
        mixed = ctx.rollout(policy, [{"question_id": trajectories[i].question_id} for i in order])
        for e, i in enumerate(order):
            nt = mixed[e]
            nt.sample_index = trajectories[i].sample_index
            kept = per[i][: cuts[i]]
            rewards[i] = w * nt.reward + (1 - w) * ((sum(kept) / len(kept)) / 9 if kept else 0.0)
            spans = nt.info["turn_spans"]
            masks[i] = [1 if (k < cuts[i] or cfg.train_on_teacher_tokens) else 0 for k, (a, b) in enumerate(spans) for _ in range(b - a)]
            nt.info["replaced_from_turn"] = cuts[i]
            out_trajs[i] = nt
    kept_scores = [s for s in flat if s is not None]
    return Signal(rewards=rewards, trajectories=out_trajs, train_masks=masks,
                  metrics={**m, **_stats(kept_scores), "dropped": sum(r is None for r in rewards), "replaced": len(cuts)})


def needs(cfg: OVDConfig) -> frozenset[str]:
    score = "score_distribution" if cfg.score == "expected" else "score"
    return frozenset({score, "act"}) if cfg.mode == "replace" else frozenset({score})


def loss(mb, teacher, cfg: OVDConfig):
    from distill.methods import pg_term

    return pg_term(mb, cfg)


METHOD = Method("ovd", OVDConfig, needs=needs, prepare=prepare, loss=loss)
