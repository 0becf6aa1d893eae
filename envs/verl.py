"""WebQA inside verl: an agent loop that plays one ``WebQA-v0`` episode per sample, token in, token out.

verl's contract (read in ``verl/experimental/agent_loop/agent_loop.py`` of verl 0.9.1, the PyPI
release, run against here, and of GitHub main at b178a3c, 0.8.0.dev, 2026-01-29; the parts used
here are the same in both): an ``AgentLoopWorker`` instantiates, for every sample, the class registered under the row's
``agent_name`` (``hydra.utils.instantiate`` with ``trainer_config``, ``server_manager``,
``tokenizer``, ``processor`` and the dataset config as keyword arguments, plus the extra keys of
the loop's YAML entry) and awaits ``run(sampling_params, **row)``, where ``row`` holds the
dataset columns (``raw_prompt``, ``extra_info``, ``reward_model``, ``data_source``, ``index``,
...). ``run`` returns an ``AgentLoopOutput``: ``prompt_ids``, ``response_ids`` (generated and
observation tokens interleaved), ``response_mask`` (1 = generated), ``response_logprobs``,
``reward_score``, ``num_turns``, ``metrics`` and ``extra_fields``. Generation is
``await server_manager.generate(request_id, prompt_ids=..., sampling_params=...)``, which
returns a ``TokenOutput`` (``token_ids``, ``log_probs``, ``num_preempted``, ...). When every
sample has a ``reward_score`` verl puts it on the last response token (``rm_scores``) and skips
its reward function; ``extra_fields["reward_extra_info"]`` (numbers) becomes per-sample columns
that verl logs.

Ours: :func:`play_episode` drives the env's own ``step`` in the token layout of
``agents/rollout.py``: the prompt is the row's messages through the tokenizer's chat template, then
each turn the generated ids are appended as generated (mask 1, their log-probs), cut after the
first action end (``</search>``, ``</browse>``, ``</answer>``; ``</tool_call>`` with
``protocol="tool_call"``; also sent to the server as ``stop``), the decoded text goes to
``env.step``, and the observation is tokenised on its own and appended (mask 0, log-prob 0). The
history is never decoded and re-encoded. Malformed actions get the env's error observation and the
episode goes on. ``reward_score`` is the env's reward (its ``reward=`` metric, minus
``format_penalty``) and ``reward_extra_info`` carries EM, F1 and cover-EM from ``envs/grading.py``.
Departures from ``agents/rollout.py``, for verl: the observation that ends an episode (the
turn-limit notice) is not appended, and an observation that does not fit in
``rollout.response_length`` ends the episode unappended with reward 0, so a response always ends on
a generated token, where verl puts the reward. verl's: the servers, batching, padding, advantages
and the update.

Use: make the data (``build_dataset("hotpotqa:train", top_k=3, max_turns=4).to_parquet("train.parquet")``,
the env arguments the same as the loop's), then point
``actor_rollout_ref.rollout.agent.agent_loop_config_path`` at a file such as::

    - name: webqa
      _target_: envs.verl.WebQAAgentLoop
      env_id: WebQA-v0
      env_kwargs: {top_k: 3, max_turns: 4}
      max_tokens_per_turn: 500

with ``data.train_files=train.parquet``. The rows' ``agent_name`` column picks the loop
(``rollout.agent.default_agent_loop=webqa`` does too); rollouts must be async (verl
0.9's default) and ``rollout.calculate_log_probs=True`` (0.9's default) brings the log-probs.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from uuid import uuid4

import gymnasium as gym

import envs  # noqa: F401  (registers the ids)

AGENT_NAME = "webqa"
STOPS = {"tags": ("</search>", "</browse>", "</answer>"), "tool_call": ("</tool_call>",)}
_STEP_LOCK = threading.Lock()  # env steps run in worker threads, one at a time per process


@dataclass
class Episode:
    """One episode in verl's layout; ``response_logprobs`` is None when the server sent none."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    response_logprobs: list[float] | None = field(default_factory=list)
    actions: list[str] = field(default_factory=list)  # the text each turn sent to env.step
    observations: list[str] = field(default_factory=list)  # every observation, appended or not
    reward: float = 0.0
    info: dict = field(default_factory=dict)  # the env's info at the last step
    end_reason: str = ""  # "answer", "max_turns" (the env's) or "response_length" (the budget)
    num_turns: int = 1  # verl's count: the prompt, each action, each appended observation
    metrics: dict = field(default_factory=lambda: {"generate_sequences": 0.0, "tool_calls": 0.0, "num_preempted": -1})

    @property
    def reward_extra_info(self) -> dict[str, float]:
        """The per-sample numbers verl logs (``extra_fields["reward_extra_info"]``)."""
        i = self.info
        return {"em": float(i.get("em", 0.0) or 0.0), "f1": float(i.get("f1", 0.0) or 0.0),
                "cover_em": float(i.get("cover_em", 0.0) or 0.0), "answered": float(i.get("answer") is not None),
                "invalid_actions": float(i.get("invalid_actions", 0)), "turns": float(len(self.actions))}


async def play_episode(server_manager: Any, env: gym.Env, tokenizer: Any, prompt_ids: Sequence[int],
                       sampling_params: dict[str, Any], *, response_length: int, max_tokens_per_turn: int = 500,
                       request_id: str | None = None) -> Episode:
    """Play the episode ``env`` has just been reset to, from ``prompt_ids``, with verl's server manager.

    ``response_length`` caps the response (generated plus observation tokens); each turn asks
    for at most ``max_tokens_per_turn`` new tokens, stopping at the end of an action.
    """
    base = env.unwrapped
    stops = STOPS[getattr(base, "protocol", "tags")]
    request_id = request_id or uuid4().hex  # one id per episode: verl keeps its turns on one server
    ep = Episode(list(prompt_ids), response_logprobs=[] if sampling_params.get("logprobs") else None)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    while True:
        room = response_length - len(ep.response_ids)
        if room <= 0:
            return _end(ep, "response_length")
        params = dict(sampling_params, max_tokens=min(max_tokens_per_turn, room), stop=list(stops))
        t0 = time.perf_counter()
        out = await server_manager.generate(request_id, prompt_ids=ep.prompt_ids + ep.response_ids,
                                            sampling_params=params)
        ep.metrics["generate_sequences"] += time.perf_counter() - t0
        if out.num_preempted is not None:
            ep.metrics["num_preempted"] = max(ep.metrics["num_preempted"], 0) + out.num_preempted
        ids = list(out.token_ids)[:room]
        ids = ids[: _stop_end(ids, decode, stops)]
        ep.response_ids += ids
        ep.response_mask += [1] * len(ids)
        if ep.response_logprobs is not None:
            if not out.log_probs:
                raise ValueError("sampling_params asked for log-probs but the server returned none")
            ep.response_logprobs += [float(x) for x in out.log_probs[: len(ids)]]
        ep.actions.append(decode(ids))
        ep.num_turns += 1
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, info = await asyncio.get_running_loop().run_in_executor(
            None, _step, env, ep.actions[-1])
        ep.metrics["tool_calls"] += time.perf_counter() - t0
        ep.observations.append(obs)
        ep.info = info
        if terminated or truncated:
            ep.reward = float(reward)
            return _end(ep, info.get("end_reason") or ("answer" if terminated else "max_turns"))
        obs_ids = list(tokenizer.encode(obs, add_special_tokens=False))
        if len(ep.response_ids) + len(obs_ids) >= response_length:  # no room left to act after it
            return _end(ep, "response_length")
        ep.response_ids += obs_ids
        ep.response_mask += [0] * len(obs_ids)
        if ep.response_logprobs is not None:
            ep.response_logprobs += [0.0] * len(obs_ids)
        ep.num_turns += 1


def _step(env: gym.Env, action: str):
    with _STEP_LOCK:
        return env.step(action)


def _end(ep: Episode, reason: str) -> Episode:
    ep.end_reason = reason  # "response_length": ended by verl's budget, not the env; ep.reward stays 0
    return ep


def _stop_end(ids: list[int], decode: Callable[[list[int]], str], stops: Sequence[str]) -> int:
    """How many of ``ids`` to keep: up to the token whose text completes the first stop string (the
    server was asked to stop there; this cuts a server that ran on), else all of them."""
    if not any(s in decode(ids) for s in stops):
        return len(ids)
    lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(ids[:mid]) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


def row_options(row: dict[str, Any]) -> dict[str, Any]:
    """``env.reset`` options for a verl dataset row: the question in ``extra_info`` (``question``,
    ``answers`` or else ``reward_model.ground_truth``, optional ``id`` and ``supporting_titles``),
    or else ``extra_info.question_id`` (a question of the env's own QA set)."""
    extra = dict(row.get("extra_info") or {})
    if extra.get("question"):
        answers = extra.get("answers")
        if answers is None:
            answers = (row.get("reward_model") or {}).get("ground_truth")
        answers = [answers] if isinstance(answers, str) else [str(a) for a in (answers if answers is not None else [])]
        example = {"question": str(extra["question"]), "answers": answers}
        example.update({k: extra[k] for k in ("id", "supporting_titles", "dataset") if extra.get(k) is not None})
        if "supporting_titles" in example:
            example["supporting_titles"] = [str(t) for t in example["supporting_titles"]]
        return {"example": example}
    if extra.get("question_id") is not None:
        return {"question_id": str(extra["question_id"])}
    raise ValueError("a WebQA row needs extra_info.question (+ answers or reward_model.ground_truth) or "
                     "extra_info.question_id: make the data with envs.verl.build_dataset")


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict], tools: list[dict] | None = None,
                    **template_kwargs: Any) -> list[int]:
    """``messages`` through the chat template with the assistant turn opened."""
    out = tokenizer.apply_chat_template(list(messages), tools=tools, add_generation_prompt=True, tokenize=True,
                                        **template_kwargs)
    return [int(x) for x in (out["input_ids"] if hasattr(out, "keys") else out)]


try:  # verl is optional: without it play_episode and build_dataset still work
    from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
except ImportError as exc:  # ray, tensordict, ... missing too
    _VERL_MISSING: ImportError | None = exc
else:
    _VERL_MISSING = None

    @register(AGENT_NAME)
    class WebQAAgentLoop(AgentLoopBase):
        """verl's agent loop for WebQA: one env per sample (``gym.make(env_id, **env_kwargs)``).

        The prompt is the row's ``raw_prompt`` through the chat template (the env's own prompt
        when the row has none); the question comes from the row (:func:`row_options`).
        """

        def __init__(self, *args: Any, env_id: str = "WebQA-v0", env_kwargs: Any = None,
                     max_tokens_per_turn: int = 500, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if env_kwargs is not None and not isinstance(env_kwargs, dict):  # a DictConfig from the YAML
                from omegaconf import OmegaConf
                env_kwargs = OmegaConf.to_container(env_kwargs, resolve=True)
            self.env = gym.make(env_id, **(env_kwargs or {})).unwrapped
            self.max_tokens_per_turn = int(max_tokens_per_turn)
            self.response_length = int(self.config.actor_rollout_ref.rollout.response_length)

        async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
            prompt, _ = self.env.reset(options=row_options(kwargs))
            messages = kwargs.get("raw_prompt")
            if messages is None or not len(messages):
                messages = [{"role": "user", "content": prompt}]
            messages = list(messages)
            tools = self.env.tool_schemas() if self.env.protocol == "tool_call" else None
            template_kwargs = dict(self.apply_chat_template_kwargs or {})
            prompt_ids = chat_prompt_ids(self.tokenizer, messages, tools, **template_kwargs)
            ep = await play_episode(self.server_manager, self.env, self.tokenizer, prompt_ids, sampling_params,
                                    response_length=self.response_length,
                                    max_tokens_per_turn=self.max_tokens_per_turn)
            info = ep.info
            return AgentLoopOutput(
                prompt_ids=ep.prompt_ids, response_ids=ep.response_ids, response_mask=ep.response_mask,
                response_logprobs=ep.response_logprobs, reward_score=ep.reward, num_turns=ep.num_turns,
                metrics=ep.metrics,
                extra_fields={"reward_extra_info": ep.reward_extra_info,
                              "webqa": {"question_id": info.get("question_id"), "answer": info.get("answer"),
                                        "end_reason": ep.end_reason, "actions": ep.actions,
                                        "searches": info.get("searches")}})


def __getattr__(name: str):
    if name == "WebQAAgentLoop":
        raise ImportError(f"envs.verl.WebQAAgentLoop needs verl (pip install verl): {_VERL_MISSING}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_dataset(name: str = "hotpotqa", limit: int | None = None, *, env_id: str = "WebQA-v0",
                  agent_name: str = AGENT_NAME, **env_kwargs: Any):
    """A ``datasets.Dataset`` of a QA set (``corpora.qa`` name or JSONL path) in verl's RL format
    (write it with ``.to_parquet``): ``prompt`` (one user message: the env's instructions and the
    question, from ``gym.make(env_id, **env_kwargs)``, so ``max_turns`` matches the loop's env),
    ``data_source``, ``ability``, ``reward_model`` (``ground_truth``: the gold answers),
    ``extra_info`` (``index``, ``id``, ``question``, ``answers``, ``supporting_titles``) and
    ``agent_name``."""
    from datasets import Dataset

    from corpora.qa import load_qa

    env = gym.make(env_id, **env_kwargs).unwrapped
    rows = []
    for i, q in enumerate(load_qa(name, limit=limit)):
        answers = [q["answers"]] if isinstance(q["answers"], str) else list(q["answers"])
        extra = {"index": i, "id": str(q["id"]), "question": q["question"], "answers": answers,
                 "supporting_titles": list(q.get("supporting_titles") or [])}
        prompt, _ = env.reset(options={"example": extra})
        rows.append({"data_source": f"webqa/{q.get('dataset') or name}", "agent_name": agent_name,
                     "prompt": [{"role": "user", "content": prompt}], "ability": "search",
                     "reward_model": {"style": "rule", "ground_truth": answers}, "extra_info": extra})
    return Dataset.from_list(rows)
