"""A one-turn text env for trainer tests: any Gymnasium env that speaks the text protocol works.

The reward varies with what a random model writes (the share of vowels among the action's
letters), so group advantages are not all zero and a 2-step GRPO run must change the adapter.
Like WebQA it exposes ``questions`` and ``privileged()``.
"""
from __future__ import annotations

import gymnasium as gym

from envs.spaces import AnyText


class VowelEnv(gym.Env[str, str]):
    def __init__(self, split: str = "train", **_ignored):
        self.observation_space = AnyText(4096)
        self.action_space = AnyText(4096)
        self.max_turns = 1
        self.questions = [{"id": f"{split}-{i}", "question": f"Say something with many vowels ({i}).", "answers": ["aeiou"]}
                          for i in range(6)]
        self._q = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        qid = (options or {}).get("question_id", self.questions[0]["id"])
        self._q = next(q for q in self.questions if q["id"] == qid)
        return f"Question: {self._q['question']}\n", {"question_id": qid, "question": self._q["question"]}

    def step(self, action):
        letters = [c for c in action.lower() if c.isalpha()]
        reward = sum(c in "aeiou" for c in letters) / max(len(letters), 1)
        info = {"answer": action[:20], "em": float(reward > 0.5), "f1": reward, "cover_em": 0.0, "gold_answers": ["aeiou"]}
        return "", reward, True, False, info

    def privileged(self):
        return {"question_id": self._q["id"], "question": self._q["question"], "answers": ["aeiou"],
                "supporting_titles": ["Vowel"], "supporting_passages": ["A vowel is one of a, e, i, o, u."]}


def register():
    for env_id, split in (("ToyVowel-v0", "train"), ("ToyVowel-eval-v0", "eval")):
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=VowelEnv, kwargs={"split": split})
