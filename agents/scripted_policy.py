"""ScriptedPolicy: a scripted text agent (oracle, baseline) behind the token Policy protocol.

It lets the scripted agents run through the same rollout loop as an LLM: each call looks up
the agent of every episode (``contexts[i]["episode"]``), feeds it the latest observation and
returns the action text as token ids of the given tokenizer (log-probs 0: nothing sampled).
"""
from __future__ import annotations

from typing import Callable, Sequence

from agents.policy import Completion, SamplingParams, TokenizerPolicy


class ScriptedPolicy(TokenizerPolicy):
    def __init__(self, make_agent: Callable[[], object], tokenizer):
        self.make_agent = make_agent
        self.tokenizer = tokenizer
        self.agents: dict[int, object] = {}

    def prompt_ids(self, user_text: str, tools: list[dict] | None = None) -> list[int]:
        return self.encode(user_text)

    def generate(self, prompts, sampling: SamplingParams, contexts: Sequence[dict] | None = None) -> list[Completion]:
        if contexts is None:
            raise ValueError("ScriptedPolicy needs the rollout's per-episode contexts")
        out = []
        for ctx in contexts:
            ep = ctx["episode"]
            if ep not in self.agents or ctx["observation"] is ctx["prompt"]:
                agent = self.make_agent()
                max_turns = ctx["info"].get("max_turns", 4)
                agent.reset(ctx["prompt"], ctx["info"], ctx.get("privileged"), max_turns=max_turns)
                self.agents[ep] = agent
            text = self.agents[ep].act(ctx["observation"])
            ids = self.encode(text)
            out.append(Completion(ids, [0.0] * len(ids), text, "stop"))
        return out
