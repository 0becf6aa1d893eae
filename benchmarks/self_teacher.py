"""How opsd's privileged self-teacher differs from the student on the student's own tokens.

    python -m benchmarks.self_teacher run=results/learning_math/runs/opsd step=1 limit=4

opsd (``distill/methods/opsd.py``) pulls the student's next-token distribution p (the plain
prompt) towards the same model's distribution q with the privileged context in its prompt (the
reference answer, and on Math-v0 the reference solution), by a generalised JSD on the student's
sampled tokens. This reads the first ``limit`` trajectories a run logged at ``step``, and for the
base student and for the run's ``final_adapter`` prints, over their agent tokens: the mean entropy
of p and of q, the mean JSD(beta) between them, and how often q's argmax is the token the student
sampled. Writes ``OUT/self_teacher.json``. It measures; it asserts nothing.

The trajectories' text is tokenised again (the logged records keep text, not ids), so a token
may split differently from how it was sampled; the comparison between p and q is on the same
ids either way.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SelfTeacherConfig:
    run: str = "results/learning_math/runs/opsd"
    step: int = 1
    limit: int = 4
    max_tokens: int = 400  # of each trajectory's answer
    beta: float = 0.5  # opsd's default
    threads: int = 2
    out: str = ""  # default: the run folder


def measure(model, policy, env, recs: list[dict], beta: float, max_tokens: int, privileged_chars: int = 2000) -> dict:
    import torch

    from distill.losses import entropy, generalized_jsd
    from distill.methods.opsd import privileged_text

    def logits(seq: list[int], start: int):
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0, start - 1:-1].float()

    rows = []
    for r in recs:
        prompt, _ = env.reset(options={"question_id": r["question_id"]})
        ids = policy.encode("".join(r["actions"]))[:max_tokens]
        plain = policy.prompt_ids(prompt)
        priv = policy.prompt_ids(privileged_text(prompt, env.privileged(), privileged_chars))
        p, q = logits(plain + ids, len(plain)), logits(priv + ids, len(priv))
        rows.append({"question_id": r["question_id"], "tokens": len(ids), "entropy_student": entropy(p).mean().item(),
                     "entropy_privileged": entropy(q).mean().item(), "jsd": generalized_jsd(p, q, beta).mean().item(),
                     "privileged_argmax_is_sampled": (q.argmax(-1) == torch.tensor(ids)).float().mean().item()})
    keys = ("entropy_student", "entropy_privileged", "jsd", "privileged_argmax_is_sampled")
    return {"mean": {k: sum(x[k] for x in rows) / len(rows) for k in keys}, "trajectories": rows}


def main(argv: list[str] | None = None) -> int:
    import gymnasium as gym
    import torch
    import yaml

    import envs  # noqa: F401
    from agents.hf_policy import TransformersPolicy
    from agents.models import load_model
    from benchmarks.eval import typed_config
    from common.files import atomic_write_json

    cfg = typed_config(sys.argv[1:] if argv is None else argv, SelfTeacherConfig)
    run = Path(cfg.run)
    conf = yaml.safe_load((run / "config.yaml").read_text())
    traj = run / "trajectories" / f"step_{cfg.step:06d}.jsonl"
    if not traj.exists():
        raise SystemExit(f"error: {traj} does not exist (step= names a logged step)")
    recs = [json.loads(x) for x in traj.read_text().splitlines()][: cfg.limit]
    torch.set_num_threads(cfg.threads)
    model, tok = load_model(conf["model"]["name"], "float32")
    policy = TransformersPolicy(model, tok)
    env = gym.make(conf["env"]["id"]).unwrapped
    res = {"run": str(run), "step": cfg.step, "beta": cfg.beta, "base": measure(model, policy, env, recs, cfg.beta, cfg.max_tokens)}
    if (run / "final_adapter").exists():
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(model, str(run / "final_adapter")).eval()
        res["final_adapter"] = measure(tuned, TransformersPolicy(tuned, tok), env, recs, cfg.beta, cfg.max_tokens)
    print("| student | entropy p (plain prompt) | entropy q (privileged) | JSD | q argmax = sampled |\n|---|---|---|---|---|")
    for label in ("base", "final_adapter"):
        if label in res:
            m = res[label]["mean"]
            print(f"| {label} | {m['entropy_student']:.3f} | {m['entropy_privileged']:.3f} | {m['jsd']:.4f} | "
                  f"{m['privileged_argmax_is_sampled']:.3f} |")
    atomic_write_json(Path(cfg.out or run) / "self_teacher.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
