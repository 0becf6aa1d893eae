"""WebQA inside TRL: an environment for ``GRPOTrainer(environment_factory=...)``, its rewards and data.

TRL's contract (``trl>=1.16``, ``environment_factory``): the trainer calls the factory with no
arguments (once per concurrent rollout; instances are pooled and reused), calls
``reset(**row)`` with every column of the dataset row before each rollout (a returned string is
appended to the last user message), and turns every *public method* of the class other than
``reset`` into a tool whose JSON schema comes from the type hints and the Google-style
docstring. The model's tool calls are parsed by the chat template's response parser (a
tools-capable template such as Qwen's) and run in a loop until the model stops calling tools.
Reward functions receive the live instances as ``environments=``.

Here the instance wraps one :class:`envs.webqa.WebQAEnv` (``protocol="tool_call"``): the tools
``search``, ``browse`` and ``answer`` are its three actions, sent through ``env.step`` so that
validation, rendering, turn limits and grading are exactly the env's; the ``<tool_response>``
wrapper is removed because the chat template adds its own. An episode that ends with a plain
assistant message instead of an ``answer`` call is answered with that message's text (its
``<think>`` part dropped) when a reward reads it. :func:`em_reward`, :func:`f1_reward` and
:func:`cover_em_reward` return the env's grade (``envs/grading.py``) of that answer, 0 without
one. :func:`build_dataset` makes the conversational ``prompt`` rows from a QA set
(``corpora.qa``). The verbal teacher score as a TRL reward is in ``distill/trl_reward.py``.

Use::

    from functools import partial
    from trl import GRPOConfig, GRPOTrainer
    from envs.trl import WebQAToolEnv, build_dataset, em_reward

    trainer = GRPOTrainer(model="Qwen/Qwen3-0.6B", args=GRPOConfig(...), reward_funcs=[em_reward],
                          train_dataset=build_dataset("hotpotqa:train"),
                          environment_factory=partial(WebQAToolEnv, top_k=3, max_turns=4))

Every public method of :class:`WebQAToolEnv` is a tool the model sees: helpers stay private
(``_name``) or are properties.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

import gymnasium as gym

import envs  # noqa: F401  (registers the ids)
from envs.render import TOOL_PROMPT

_RESPONSE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.DOTALL)
_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
ROW_KEYS = ("id", "question", "answers", "dataset", "supporting_titles")


def _unwrap(obs: str) -> str:
    """The env's observation without its ``<tool_response>`` blocks (the chat template adds one)."""
    bodies = _RESPONSE.findall(obs)
    return "\n".join(b.strip() for b in bodies) if bodies else obs.strip()


class WebQAToolEnv:
    """One WebQA episode per rollout, with the env's actions as TRL tools.

    ``env_id`` is a registered WebQA id (``"WebQA-v0"``, ``"WebQA-F1-v0"``, ...) and
    ``env_kwargs`` override its arguments (``top_k``, ``max_turns``, ``retriever``, ...); the
    protocol is always ``"tool_call"``. The question comes from the dataset row given to
    ``reset``, not from the env's own QA set.
    """

    def __init__(self, env_id: str = "WebQA-v0", **env_kwargs: Any):
        env_kwargs["protocol"] = "tool_call"
        self._env = gym.make(env_id, **env_kwargs).unwrapped
        self._prompt = ""
        self._actions: list[str] = []
        self._observations: list[str] = []
        self._info: dict = {}
        self._over = True
        self._question, self._gold = "", []

    # -- TRL's reset ---------------------------------------------------------------------------
    def reset(self, **row: Any) -> str | None:
        """Start an episode on the dataset row (``question``, ``answers``, optional ``id`` and
        ``supporting_titles``; other columns are ignored). Returns None when the row carries a
        ``prompt`` (it already holds the instructions), else the env's instruction prompt."""
        example = {k: row[k] for k in ROW_KEYS if row.get(k) is not None}
        self._prompt, _ = self._env.reset(options={"example": example})
        answers = example["answers"]
        self._question, self._gold = example["question"], [answers] if isinstance(answers, str) else list(answers)
        self._actions, self._observations, self._info, self._over = [], [], {}, False
        return None if row.get("prompt") else self._prompt

    # -- the tools -----------------------------------------------------------------------------
    def search(self, query: str) -> str:
        """Search Wikipedia with BM25 and return the top passages with their page titles.

        Args:
            query: Keywords or a question to search for.

        Returns:
            The top passages, one per line, as "Doc i (Title: T) text".
        """
        return self._act("search", {"query": query})

    def browse(self, title: str, part: int = 1) -> str:
        """Read a Wikipedia page by its exact title, one window of about 300 words at a time.

        Args:
            title: The page title as shown in search results (or a Wikipedia URL).
            part: Which window of the page to read; 1 is the start.

        Returns:
            The text of that part of the page, or close titles when there is no such page.
        """
        return self._act("browse", {"title": title, "part": part})

    def answer(self, answer: str) -> str:
        """Give the final answer and end the episode.

        Args:
            answer: A short answer span: a name, date, number, yes or no.

        Returns:
            A confirmation that the answer was recorded.
        """
        return self._act("answer", {"answer": answer})

    # -- state read by the rewards (properties: not tools) ------------------------------------
    @property
    def question(self) -> str:
        return self._question

    @property
    def gold_answers(self) -> list[str]:
        """Privileged: never shown to the model."""
        return list(self._gold)

    @property
    def final_answer(self) -> str | None:
        """The graded answer, None before or without one."""
        return self._info.get("answer")

    @property
    def info(self) -> dict:
        """The env's ``info`` at the end of the episode (``em``, ``f1``, ``searches``, ...); empty before."""
        return dict(self._info)

    @property
    def actions(self) -> list[str]:
        """Each tool call of the episode as the env received it (``<tool_call>{...}</tool_call>``)."""
        return list(self._actions)

    @property
    def observations(self) -> list[str]:
        """The text returned for each action (tool results)."""
        return list(self._observations)

    @property
    def done(self) -> bool:
        return self._over

    # -- internals -----------------------------------------------------------------------------
    def _act(self, name: str, arguments: dict) -> str:
        if self._over:
            return "Error: the episode is over; no more tool calls are taken."
        action = "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"
        obs, _, terminated, truncated, info = self._env.step(action)
        text = _unwrap(obs)
        if terminated and info.get("answer") is not None:
            text = f"Answer recorded: {info['answer']}\nThe episode is over."
        self._actions.append(action)
        self._observations.append(text)
        if terminated or truncated:
            self._over, self._info = True, info
        return text

    def _finish(self, final_message: Any) -> None:
        """An episode the model left open is answered with its final plain assistant message
        (no tool call; ``<think>`` dropped), if there is one; otherwise it stays unanswered (0)."""
        if self._over or not isinstance(final_message, dict):
            return
        if final_message.get("role") != "assistant" or final_message.get("tool_calls"):
            return
        content = final_message.get("content")
        if isinstance(content, list):  # content blocks
            content = " ".join(b.get("text", "") for b in content if isinstance(b, dict))
        text = _THINK.sub("", content or "").strip()
        if text:
            self._act("answer", {"answer": text})


def finish_episodes(environments: Sequence[WebQAToolEnv], completions: Sequence | None = None) -> None:
    """Close every episode a rollout left open (idempotent; the rewards call it)."""
    if environments is None:
        raise ValueError("WebQA rewards read the env state: pass environment_factory=WebQAToolEnv to GRPOTrainer")
    for i, env in enumerate(environments):
        last = None
        if completions is not None and i < len(completions):
            c = completions[i]
            last = c[-1] if isinstance(c, list) and c else ({"role": "assistant", "content": c} if isinstance(c, str) else None)
        env._finish(last)


def _metric_reward(metric: str):
    def reward(completions=None, environments=None, **kwargs) -> list[float]:
        finish_episodes(environments, completions)
        return [float(env.info.get(metric, 0.0)) for env in environments]

    reward.__name__ = reward.__qualname__ = f"{metric}_reward"
    reward.__doc__ = f"TRL reward: the env's {metric} of each episode's answer (0 without one)."
    return reward


em_reward = _metric_reward("em")
f1_reward = _metric_reward("f1")
cover_em_reward = _metric_reward("cover_em")


def build_dataset(name: str = "hotpotqa", limit: int | None = None, *, max_turns: int = 4,
                  prompt_template: str | None = None, system: str | None = None):
    """A ``datasets.Dataset`` of a QA set (``corpora.qa`` name or JSONL path) in TRL's
    conversational prompt format: ``prompt`` (chat messages with the env's tool-use instructions
    and the question) plus ``id``, ``question``, ``answers``, ``dataset`` and
    ``supporting_titles`` for ``reset``. ``max_turns`` must match the env's."""
    from datasets import Dataset

    from corpora.qa import load_qa

    template = prompt_template or TOOL_PROMPT
    rows = []
    for q in load_qa(name, limit=limit):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": template.format(question=q["question"].strip(), max_turns=max_turns)})
        rows.append({
            "prompt": messages,
            "id": q["id"],
            "question": q["question"],
            "answers": list(q["answers"]),
            "dataset": q.get("dataset", ""),
            "supporting_titles": list(q.get("supporting_titles") or []),
        })
    return Dataset.from_list(rows)
