"""The trainer's rollout budgets are the evaluation's: an episode that fits the held-out
evaluation fits training too (a 768-token budget once ended every training episode that searched
before it could answer, so every reward was 0)."""
from agents.evaluation import MAX_TOKENS_PER_TURN, MAX_TOTAL_TOKENS
from distill.config import TrainConfig, resolve


def test_training_budgets_are_the_evaluation_budgets():
    cfg, _ = resolve(["method=ovd"])
    assert (cfg.max_tokens_per_turn, cfg.max_total_tokens) == (MAX_TOKENS_PER_TURN, MAX_TOTAL_TOKENS)
    assert (TrainConfig.max_tokens_per_turn, TrainConfig.max_total_tokens) == (MAX_TOKENS_PER_TURN, MAX_TOTAL_TOKENS)


def test_yaml_and_dataclass_defaults_agree():
    cfg, _ = resolve([])
    for key in ("steps", "questions_per_step", "group_size", "max_tokens_per_turn", "max_total_tokens", "lr", "temperature"):
        assert getattr(cfg, key) == getattr(TrainConfig, key), key
