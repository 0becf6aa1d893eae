"""Gymnasium environments. Importing this package registers every id in ``REGISTRY``.

``gym.make("WebQA-v0")`` also works without importing ``envs``: the ``gymnasium.envs`` entry
point in ``pyproject.toml`` calls ``register_envs`` when Gymnasium loads plugins.
Each id is one line: an entry point and its kwargs. Variants are lines with other kwargs, not
subclasses; another env (``Math-v0``, a user's) is a line with its own entry point.
"""
from __future__ import annotations

import gymnasium as gym

WEBQA = "envs.webqa:WebQAEnv"
WEBQA_VECTOR = "envs.vector:WebQAVectorEnv"
MATH = "envs.math:MathEnv"

# id -> (entry point, vector entry point or None, kwargs). WebQA dataset names are resolved by
# corpora.qa (default splits there).
REGISTRY: dict[str, tuple[str, str | None, dict]] = {
    "WebQA-v0": (WEBQA, WEBQA_VECTOR, {}),  # HotpotQA dev, the 500 questions whose paragraphs are all in the bundled corpus
    "WebQA-HotpotQA-v0": (WEBQA, WEBQA_VECTOR, {"dataset": "hotpotqa"}),
    "WebQA-HotpotQA-train-v0": (WEBQA, WEBQA_VECTOR, {"dataset": "hotpotqa:train"}),
    "WebQA-NQ-v0": (WEBQA, WEBQA_VECTOR, {"dataset": "nq"}),
    "WebQA-TriviaQA-v0": (WEBQA, WEBQA_VECTOR, {"dataset": "triviaqa"}),
    "WebQA-PopQA-v0": (WEBQA, WEBQA_VECTOR, {"dataset": "popqa"}),
    "WebQA-2Wiki-v0": (WEBQA, WEBQA_VECTOR, {"dataset": "2wikimultihopqa"}),
    "WebQA-MuSiQue-v0": (WEBQA, WEBQA_VECTOR, {"dataset": "musique"}),
    "WebQA-MuSiQue-train-v0": (WEBQA, WEBQA_VECTOR, {"dataset": "musique:train"}),
    "WebQA-Bamboogle-v0": (WEBQA, WEBQA_VECTOR, {"dataset": "bamboogle"}),
    "WebQA-ToolCall-v0": (WEBQA, WEBQA_VECTOR, {"protocol": "tool_call"}),
    "WebQA-F1-v0": (WEBQA, WEBQA_VECTOR, {"reward": "f1"}),
    "WebQA-Web-v0": (WEBQA, WEBQA_VECTOR, {"pages": "web"}),  # <browse>URL</browse> reads live pages (SSRF-guarded)
    "WebQA-SearchR1-v0": (WEBQA, WEBQA_VECTOR, {"obs_format": "search-r1"}),  # Search-R1's observation text, exactly
    "Math-v0": (MATH, None, {}),  # GSM8K test (1,319)
    "Math-GSM8K-v0": (MATH, None, {"dataset": "gsm8k"}),
    "Math-GSM8K-train-v0": (MATH, None, {"dataset": "gsm8k:train"}),  # 7,473 problems with solutions: training
    "Math-MATH500-v0": (MATH, None, {"dataset": "math500"}),
}

# Dataset name -> env id, for CLIs that take "datasets=nq,hotpotqa".
DATASET_ENV_IDS = {
    "hotpotqa": "WebQA-HotpotQA-v0",
    "nq": "WebQA-NQ-v0",
    "triviaqa": "WebQA-TriviaQA-v0",
    "popqa": "WebQA-PopQA-v0",
    "2wikimultihopqa": "WebQA-2Wiki-v0",
    "musique": "WebQA-MuSiQue-v0",
    "bamboogle": "WebQA-Bamboogle-v0",
    "gsm8k": "Math-GSM8K-v0",
    "math500": "Math-MATH500-v0",
}


def register_envs() -> None:
    for env_id, (entry, vector_entry, kwargs) in REGISTRY.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry, vector_entry_point=vector_entry, kwargs=dict(kwargs))


register_envs()
