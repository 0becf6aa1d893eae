"""Scripted agents: a privileged oracle and a non-privileged heuristic baseline.

Both speak the ``tags`` protocol through plain text, like any LLM would:
``reset(prompt, info, privileged)`` starts an episode, ``act(observation) -> action text``.

* ``OracleAgent`` reads ``env.unwrapped.privileged()``: it searches each gold supporting
  title (as many as the turn budget allows, keeping one turn to answer), then answers with
  the first gold alias, so it answers by the last turn allowed (``max_turns`` from the env's
  reset info). EM must be 1.0: it checks that env, corpus, grading and registry fit.
* ``BaselineAgent`` sees only the question. It searches the question verbatim and answers
  from the top passage by this heuristic (documented so its EM can be reproduced):
  1. yes/no question (starts with is/are/was/were/do/does/did/can/could/has/have/had/will/
     would/should): answer ``yes``;
  2. "A or B" question: answer the option whose words overlap most with the titles and text
     of the retrieved passages (first option on ties);
  3. "when"/"what year"/"which year": the first 4-digit year in the top passage;
     "how many"/"how much": the first number in the top passage;
  4. otherwise the first run of capitalised words in the top passage that is not in the
     question (e.g. a name), else the top passage's title.

Run: ``python -m agents.scripted --agent oracle --limit 500``.
"""
from __future__ import annotations

import argparse
import re
import time

from envs.grading import normalize_answer

YES_NO = re.compile(r"^(is|are|was|were|do|does|did|can|could|has|have|had|will|would|should)\b", re.I)
OR_OPTIONS = re.compile(r"(?:,|:)?\s*([^,?:]+?)\s+or\s+([^,?]+?)\s*\?*\s*$", re.I)
YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
NUMBER = re.compile(r"\b\d[\d,\.]*\b")
CAPS = re.compile(r"(?:[A-Z][\w'\-\.]*(?:\s+(?:of|the|de|von|van|and|&)\s+|\s+)?)+")
DOC = re.compile(r"Doc \d+ \(Title: (.*?)\) (.*)")


class OracleAgent:
    """Privileged: searches the gold titles, then answers the first gold alias."""

    name = "oracle"

    def reset(self, prompt: str, info: dict, privileged: dict | None = None, max_turns: int | None = None) -> None:
        """Plan the episode. The turn limit is the env's (``info["max_turns"]``); ``max_turns``
        is for envs whose info lacks it."""
        if privileged is None:
            raise ValueError("the oracle needs env.unwrapped.privileged()")
        max_turns = info.get("max_turns", max_turns)
        if max_turns is None:
            raise ValueError("the oracle needs the env's turn limit: info['max_turns'] or max_turns=")
        titles = privileged.get("supporting_titles") or [privileged["question"]]
        self.plan = [f"<search>{t}</search>" for t in titles[: max(0, int(max_turns) - 1)]]
        self.plan.append(f"<answer>{privileged['answers'][0]}</answer>")

    def act(self, observation: str) -> str:
        return self.plan.pop(0)


class BaselineAgent:
    """Non-privileged: search the question, answer from the top passage (module docstring)."""

    name = "baseline"

    def reset(self, prompt: str, info: dict, privileged: dict | None = None, max_turns: int = 4) -> None:
        self.question = info["question"].strip()
        self.turn = 0

    def act(self, observation: str) -> str:
        self.turn += 1
        if self.turn == 1:
            return f"<search>{self.question}</search>"
        return f"<answer>{heuristic_answer(self.question, observation)}</answer>"


def _docs(observation: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in map(DOC.match, observation.strip().splitlines()) if m]


def heuristic_answer(question: str, observation: str) -> str:
    docs = _docs(observation.replace("<information>", "\n").replace("</information>", "\n"))
    q = question.strip()
    if YES_NO.match(q):
        return "yes"
    m = OR_OPTIONS.search(q)
    if m:
        options = [m.group(1).split(",")[-1].strip(), m.group(2).strip()]
        options = [re.sub(r"^(?:which|who|what)\b.*?\b(?:the|a|an)?\s*", "", o, flags=re.I) or o for o in options]
        seen = " ".join(normalize_answer(f"{t} {x}") for t, x in docs).split()
        overlap = [sum(w in seen for w in normalize_answer(o).split()) for o in options]
        return options[max(range(2), key=lambda i: (overlap[i], -i))]
    if not docs:
        return "unknown"
    title, text = docs[0]
    ql = q.lower()
    if ql.startswith("when") or "what year" in ql or "which year" in ql:
        y = YEAR.search(text)
        if y:
            return y.group(0)
    if ql.startswith(("how many", "how much")):
        n = NUMBER.search(text)
        if n:
            return n.group(0)
    qwords = set(normalize_answer(q).split())
    for span in CAPS.finditer(text):
        cand = span.group(0).strip(" .,'")
        words = normalize_answer(cand).split()
        if words and not set(words) <= qwords:
            return cand
    return title


AGENTS = {"oracle": OracleAgent, "baseline": BaselineAgent}


def evaluate(agent_name: str, env_id: str = "WebQA-v0", limit: int | None = None, show_progress: bool = True) -> dict:
    """A scripted agent on the first ``limit`` questions of ``env_id``, through the one rollout
    loop and the one evaluation (``agents.evaluation``) as any LLM: (summary, records)."""
    import gymnasium as gym
    from tqdm.auto import tqdm

    import envs  # noqa: F401  (registers the ids when run from a source checkout)
    from agents.evaluation import evaluate as run_eval
    from agents.models import byte_tokenizer
    from agents.scripted_policy import ScriptedPolicy

    make_env = lambda: gym.make(env_id)  # noqa: E731
    questions = make_env().unwrapped.questions
    ids = [q["id"] for q in (questions if limit is None else questions[:limit])]
    t0 = time.perf_counter()
    with tqdm(total=len(ids), desc=f"{agent_name} on {env_id}", disable=not show_progress) as bar:
        summary, recs = run_eval(ScriptedPolicy(AGENTS[agent_name], byte_tokenizer()), make_env, ids, env_id,
                                 max_tokens_per_turn=10**9, max_total_tokens=10**9, with_privileged=agent_name == "oracle",
                                 progress=lambda done, total: bar.update(done - bar.n))
    recall = [r["supporting_title_recall"] for r in recs if r["supporting_title_recall"] is not None]
    return {**summary, "supporting_title_recall": sum(recall) / len(recall) if recall else None, "agent": agent_name,
            "env_id": env_id, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Evaluate a scripted agent in a WebQA env.")
    ap.add_argument("--agent", choices=sorted(AGENTS), default="baseline")
    ap.add_argument("--env", default="WebQA-v0")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    res = evaluate(args.agent, args.env, args.limit)
    print("\n| agent | env | episodes | EM | F1 | cover-EM | gold-title recall | turns | seconds |\n|---|---|---|---|---|---|---|---|---|")
    rec = "-" if res["supporting_title_recall"] is None else f"{res['supporting_title_recall']:.3f}"
    print(f"| {res['agent']} | {res['env_id']} | {res['episodes']} | {res['em']:.3f} | {res['f1']:.3f} | {res['cover_em']:.3f} | {rec} | {res['avg_turns']:.2f} | {res['seconds']} |")
    if args.json:
        from common.files import atomic_write_json

        atomic_write_json(args.json, res)


if __name__ == "__main__":
    main()
