"""A teacher inside vLLM on this GPU: verbal scores by generation, token log-probs from vLLM's
``prompt_logprobs`` (the log-prob of every prompt token given its prefix, one prefill pass).

Capabilities: ``score``, ``score_distribution`` (the ten digits' probabilities after
``Score:``, from one generated token's top log-probs), ``logprobs``, ``topk_logprobs``, ``act``
(``policy()`` with the student's tokenizer; ``chat`` otherwise). No full distributions or
hidden states (vLLM does not return them): methods needing those take a local teacher.
``tests/distill/test_vllm_teacher.py`` runs where vLLM can (a CUDA GPU, or vLLM's CPU build).
"""
from __future__ import annotations

from typing import Sequence

from distill.teachers.local import SCORE_PREFIX, digit_tokens


class VLLMTeacher:
    capabilities = frozenset({"score", "score_distribution", "logprobs", "topk_logprobs", "act"})

    def __init__(self, model: str, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.35, **kw):
        from agents.vllm_policy import VLLMPolicy

        self._policy = VLLMPolicy(model, dtype=dtype,
                                  gpu_memory_utilization=gpu_memory_utilization, enable_lora=False, **kw)
        self.tokenizer, self.name = self._policy.tokenizer, f"vllm:{model}"
        self.stats = {"requests": 0, "errors": 0}

    def _prompt_logprobs(self, seqs, k: int):
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        sp = VSP(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        outs = self._policy.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, s))) for s in seqs], sp, use_tqdm=False)
        self.stats["requests"] += len(seqs)
        return [o.prompt_logprobs for o in outs]

    def logprobs(self, seqs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]):
        res = []
        for seq, ts, plp in zip(seqs, targets, self._prompt_logprobs(seqs, 0)):
            res.append([float(plp[t][int(seq[t])].logprob) for t in ts])
        return res

    def topk_logprobs(self, seqs, targets, k: int):
        import torch

        res = []
        for seq, ts, plp in zip(seqs, targets, self._prompt_logprobs(seqs, k)):
            ids, vals = [], []
            for t in ts:
                top = sorted(((tid, lp.logprob) for tid, lp in plp[t].items() if lp.rank is not None and lp.rank <= k),
                             key=lambda x: -x[1])[:k]
                ids.append([i for i, _ in top])
                vals.append([v for _, v in top])
            res.append((torch.tensor(ids), torch.tensor(vals)))
        return res

    def score(self, messages, sample: bool = False, seed: int = 0):
        from agents.policy import SamplingParams, chat_ids

        prefix = self.tokenizer.encode(SCORE_PREFIX, add_special_tokens=False)
        prompts = []
        for msgs in messages:
            prompts.append(chat_ids(self.tokenizer, msgs) + prefix)
        sp = SamplingParams(temperature=0.8 if sample else 0.0, max_new_tokens=4, stop=("\n",), seed=seed)
        self.stats["requests"] += len(prompts)
        return [SCORE_PREFIX + c.text for c in self._policy.generate(prompts, sp)]

    def score_distribution(self, messages, top: int = 20):
        """P(digit 0..9) right after ``Score:`` for each chat, renormalised over the ten digits
        among the first generated token's ``top`` log-probs (None if none of them is a digit)."""
        import math

        from agents.policy import chat_ids
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        head, digits = digit_tokens(self.tokenizer, self.name)
        prompts = [TokensPrompt(prompt_token_ids=chat_ids(self.tokenizer, m) + head) for m in messages]
        outs = self._policy.llm.generate(prompts, VSP(max_tokens=1, temperature=0.0, logprobs=top), use_tqdm=False)
        self.stats["requests"] += len(prompts)
        res = []
        for o in outs:
            step = (o.outputs[0].logprobs or [{}])[0]
            probs = [math.exp(step[d].logprob) if d in step else 0.0 for d in digits]
            z = sum(probs)
            res.append([p / z for p in probs] if z > 0 else None)
        return res

    def chat(self, messages, sampling):
        """The teacher's reply to each chat (its own template), up to the first of ``sampling.stop``."""
        from agents.policy import chat_ids

        return [c.text for c in self._policy.generate([chat_ids(self.tokenizer, m) for m in messages], sampling)]

    def policy(self):
        return self._policy

    def close(self) -> None:
        """Stop the vLLM engine's processes."""
        self._policy.close()
