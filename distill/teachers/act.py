"""A teacher acting in the env on a student's trajectory (ovd's continuations, teacher feedback).

Two ways to act, chosen by ``teacher_actor``:

* **exact ids**: a local teacher that shares the student's tokenizer continues the student's
  own token stream (``teacher.policy()``); its ids are kept as generated.
* **chat** (any other teacher: a local model with another tokenizer, an HTTP chat endpoint):
  the episode so far is rendered as chat messages (user: the env's prompt; then assistant: each
  action, user: each observation), the teacher replies with text, and the reply, cut after its
  first action, is tokenised with the *student's* tokenizer. No shared tokenizer is needed.

Every completion the teacher writes carries ``extra["source"] = "teacher"``, so the rollout
marks its tokens ``SOURCE_TEACHER`` in ``Trajectory.sources``. ``PrefixPolicy`` replays a
student's first turns token for token and hands the rest of each episode to the actor.
"""
from __future__ import annotations

from typing import Sequence

from agents.policy import Completion, SamplingParams, first_stop


CONTINUE = ("\n\nHere is the beginning of your reply. Continue it from exactly where it stops, without "
            "repeating it:\n\n{partial}")


def history_messages(ctx: dict) -> list[dict]:
    """The episode in ``ctx`` (the rollout's context: prompt, actions, observations) as chat;
    ``ctx["partial_text"]``, the start of this turn's reply, is asked to be continued."""
    msgs = [{"role": "user", "content": ctx["prompt"]}]
    for k, action in enumerate(ctx.get("actions") or []):
        msgs.append({"role": "assistant", "content": action})
        obs = (ctx.get("observations") or [])[k] if k < len(ctx.get("observations") or []) else ""
        msgs.append({"role": "user", "content": obs or "(no observation)"})
    if ctx.get("partial_text"):
        msgs[-1] = {"role": "user", "content": msgs[-1]["content"] + CONTINUE.format(partial=ctx["partial_text"])}
    return msgs


class _StudentTokens:
    """Text <-> ids in the student's tokenizer: what the rollout asks of any policy it drives."""

    student: object

    def encode(self, text):
        return self.student.encode(text)

    def decode(self, ids):
        return self.student.decode(ids)

    def prompt_ids(self, user_text, tools=None):
        return self.student.prompt_ids(user_text, tools=tools)


class ChatActor(_StudentTokens):
    """A teacher with ``chat(messages, sampling) -> texts`` as a Policy over the student's ids."""

    def __init__(self, teacher, student):
        self.teacher, self.student = teacher, student
        self.failed: set[int] = set()  # episodes where a chat request failed

    def generate(self, prompts, sampling: SamplingParams, contexts=None) -> list[Completion]:
        if contexts is None or any("prompt" not in c for c in contexts):
            raise ValueError("a chat teacher acts on the rollout's contexts (prompt, actions, observations)")
        texts = self.teacher.chat([history_messages(c) for c in contexts], sampling)
        out = []
        for ctx, text in zip(contexts, texts):
            if text is None:
                self.failed.add(ctx["episode"])
                text = ""
            end = first_stop(text, sampling.stop)
            text = text[:end] if end >= 0 else text
            ids = self.student.encode(text)[: sampling.max_new_tokens]
            out.append(Completion(ids, [float("nan")] * len(ids), self.student.decode(ids), "stop" if end >= 0 else "length",
                                  {"source": "teacher", "retokenized": True}))
        return out


class _Marked:
    """``inner``'s completions marked as the teacher's (the exact-ids actor)."""

    def __init__(self, inner):
        self.inner, self.failed = inner, set()

    def generate(self, prompts, sampling, contexts=None):
        outs = self.inner.generate(prompts, sampling)
        for c in outs:
            c.extra["source"] = "teacher"
        return outs


def teacher_actor(teacher, student, student_tokenizer):
    """The teacher as an acting Policy over the student's ids: exact ids where it is a local
    model sharing the student's tokenizer, chat otherwise."""
    from distill.teachers import same_tokenizer

    if hasattr(teacher, "policy") and same_tokenizer(getattr(teacher, "tokenizer", None), student_tokenizer):
        try:
            return _Marked(teacher.policy())
        except NotImplementedError:
            pass
    if not hasattr(teacher, "chat"):
        raise ValueError(f"teacher {getattr(teacher, 'name', teacher)!r} can neither chat nor continue the student's tokens")
    return ChatActor(teacher, student)


class PrefixPolicy(_StudentTokens):
    """Replays each episode's first turns (``forced[episode]``, the student's completions) token
    for token, then lets ``actor`` act; ``heads[episode]``, the start of the next turn (the
    student's first steps of a one-turn solution), is kept and the actor continues it: an
    exact-ids actor from the student's own ids, a chat actor from its text (``partial_text``).
    ``sampling`` overrides the actor's sampling parameters (e.g. its temperature)."""

    def __init__(self, student, actor, forced: dict[int, list[Completion]], heads: dict[int, Completion] | None = None,
                 **sampling):
        self.student, self.actor, self.forced, self.sampling = student, actor, forced, sampling
        self.heads = dict(heads or {})
        self.turns: dict[int, int] = {}

    def _replayed(self, ep: int) -> Completion | None:
        """Episode ``ep``'s next turn: the student's, replayed, while it has one (counts the turn)."""
        k = self.turns.get(ep, 0)
        self.turns[ep] = k + 1
        forced = self.forced.get(ep, [])
        return forced[k] if k < len(forced) else None

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, contexts=None):
        from dataclasses import replace

        out: list[Completion | None] = [self._replayed(ctx["episode"]) for ctx in contexts]
        delegate = [i for i, c in enumerate(out) if c is None]
        if delegate:
            sp = replace(sampling, **self.sampling) if self.sampling else sampling
            heads = [self.heads.pop(contexts[i]["episode"], None) for i in delegate]
            ps = [list(prompts[i]) + (h.token_ids if h else []) for i, h in zip(delegate, heads)]
            cs = [dict(contexts[i], partial_text=h.text) if h else contexts[i] for i, h in zip(delegate, heads)]
            got = self.actor.generate(ps, sp, cs)
            for i, h, c in zip(delegate, heads, got):
                out[i] = c if h is None else self._joined(h, c, sampling.max_new_tokens)
        return out

    def turn_scheduler(self, sampling: SamplingParams):
        """The exact-ids actor's continuous scheduler behind the replayed turns (see
        :class:`_PrefixScheduler`); None (the rollout runs lockstep over :meth:`generate`) for a
        chat actor or a policy without one."""
        from dataclasses import replace

        inner = getattr(self.actor, "inner", None) if isinstance(self.actor, _Marked) else None
        if inner is None or not hasattr(inner, "turn_scheduler"):
            return None
        sched = inner.turn_scheduler(replace(sampling, **self.sampling) if self.sampling else sampling)
        return None if sched is None else _PrefixScheduler(self, sched)

    def _joined(self, head: Completion, c: Completion, budget: int) -> Completion:
        """The student's head of a turn and the actor's continuation as one turn, per-token sources."""
        from agents.rollout import SOURCE_STUDENT, SOURCE_TEACHER

        ids = (list(head.token_ids) + list(c.token_ids))[:budget]
        lps = (list(head.logprobs) + list(c.logprobs))[:budget]
        sources = ([SOURCE_STUDENT] * len(head.token_ids) + [SOURCE_TEACHER] * len(c.token_ids))[:budget]
        return Completion(ids, lps, self.student.decode(ids), c.finish_reason, {**c.extra, "source": "teacher", "sources": sources})


class _PrefixScheduler:
    """:class:`PrefixPolicy` on its actor's continuous scheduler (``agents.schedulers``): a
    replayed student turn comes back at once; the actor's turns decode in one continuous batch,
    where a row whose turn ends leaves it and rejoins, observation prefilled, while the others
    keep decoding. Lockstep made every teacher turn last as long as its longest row, so the
    decode steps of a continuation were the sum of the turns' maxima, not the longest episode."""

    def __init__(self, owner: PrefixPolicy, inner):
        self.owner, self.inner = owner, inner
        self.ready: list[tuple[int, Completion]] = []  # replayed turns, returned by the next advance
        self.heads: dict[int, tuple[Completion, int]] = {}  # key -> (the student's head of this turn, budget)

    def submit(self, key: int, ids, max_new_tokens: int, context: dict | None = None) -> None:
        replayed = self.owner._replayed(key)  # the rollout's key is the episode index
        if replayed is not None:
            self.ready.append((key, replayed))
            return
        head = self.owner.heads.pop(key, None)
        if head is None:
            self.inner.submit(key, ids, max_new_tokens, context)
            return
        self.heads[key] = (head, max_new_tokens)
        room = max(1, max_new_tokens - len(head.token_ids))
        self.inner.submit(key, list(ids) + list(head.token_ids), room, dict(context or {}, partial_text=head.text))

    def release(self, key: int) -> None:
        self.inner.release(key)
        self.heads.pop(key, None)

    def advance(self) -> list[tuple[int, Completion]]:
        if self.ready:
            out, self.ready = self.ready, []
            return out
        out = []
        for key, c in self.inner.advance():
            c.extra["source"] = "teacher"
            if key in self.heads:
                head, budget = self.heads.pop(key)
                c = self.owner._joined(head, c, budget)
            out.append((key, c))
        return out
