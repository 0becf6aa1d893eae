"""Every invalid config value is one line ``error: <key>: <what is allowed>, got <value>`` on
stderr and exit code 2 from ``python -m distill.run`` (run in-process): no traceback, no silent
run that does nothing. The base overrides are a tiny valid run, so a value that slipped through
validation would train (or crash) instead of exiting 2."""
import pytest

from distill.config import ConfigError, resolve
from distill.run import main

BASE = ["model=tiny", "method=grpo", "env.id=ToyVowel-v0", "env.eval_id=ToyVowel-eval-v0", "steps=1",
        "questions_per_step=1", "group_size=1", "max_tokens_per_turn=4", "max_total_tokens=32", "eval.questions=0",
        "progress=false", "tensorboard=false", "threads=1"]

# (overrides, the key the error line must name)
BAD = [
    (["steps=-1"], "steps"),
    (["steps=0"], "steps"),
    (["steps=abc"], "steps"),
    (["questions_per_step=0"], "questions_per_step"),
    (["group_size=0"], "group_size"),
    (["micro_batch_size=0"], "micro_batch_size"),
    (["max_tokens_per_turn=0"], "max_tokens_per_turn"),
    (["max_total_tokens=-5"], "max_total_tokens"),
    (["save_every=0"], "save_every"),
    (["keep_checkpoints=0"], "keep_checkpoints"),
    (["eval.questions=-1"], "eval.questions"),
    (["lr=0"], "lr"),
    (["lr=-1e-3"], "lr"),
    (["lr=nan"], "lr"),
    (["temperature=-1"], "temperature"),
    (["top_p=0"], "top_p"),
    (["top_p=1.5"], "top_p"),
    (["weight_decay=-0.1"], "weight_decay"),
    (["warmup_steps=-1"], "warmup_steps"),
    (["max_grad_norm=0"], "max_grad_norm"),
    (["seed=-1"], "seed"),
    (["threads=-1"], "threads"),
    (["env.max_tokens_per_turn=0"], "env.max_tokens_per_turn"),
    (["env.name=atari"], "env.name"),
    (["rollout.dtype=float16"], "rollout.dtype"),
    (["env=nosuch"], "env"),
    (["env.max_turns=0"], "env.max_turns"),
    (["env.max_turns=abc"], "env.max_turns"),
    (["env.top_k=0"], "env.top_k"),
    (["env.reward=bleu"], "env.reward"),
    (["env.protocol=json"], "env.protocol"),
    (["teacher=http"], "teacher.url"),
    (["teacher=http", "teacher.url=127.0.0.1:8001/v1"], "teacher.url"),
    (["teacher.kind=magic"], "teacher.kind"),
    (["teacher=nosuch"], "teacher"),
    (["teacher=http", "teacher.url=http://127.0.0.1:1/v1", "teacher.timeout=0"], "teacher.timeout"),
    (["teacher.retries=-1"], "teacher.retries"),
    (["teacher.concurrency=0"], "teacher.concurrency"),
    (["teacher.batch_size=0"], "teacher.batch_size"),
    (["teacher=teacher", "teacher.batch_size=0"], "teacher.batch_size"),  # a key of local, a bad value
    (["teacher=http", "teacher.url=http://127.0.0.1:1/v1", "teacher.batch_size=3"], "teacher.batch_size"),  # not http's
    (["teacher=teacher", "teacher.url=http://127.0.0.1:1/v1"], "teacher.url"),  # not local's
    (["model=nosuch"], "model"),
    (["model.lora_r=0"], "model.lora_r"),
    (["model.lora_alpha=0"], "model.lora_alpha"),
    (["model.lora_dropout=1.5"], "model.lora_dropout"),
    (["model.dtype=int8"], "model.dtype"),
    (["model.tiny_hidden=0"], "model.tiny_hidden"),
    (["model.tiny_layers=0"], "model.tiny_layers"),
    (["method=nosuch"], "method"),
    (["method=opd", "method.form=bad"], "method.form"),
    (["method=eopd", "method.form=jsd"], "method.form"),  # eopd's opd part is k1 only
    (["method.dual_clip=0.5"], "method.dual_clip"),
    (["nosuchkey=1"], "nosuchkey"),
]


def argv(case: list[str], tmp_path) -> list[str]:
    """BASE with the case's overrides in place of BASE's for the same key (or group)."""
    args = {o.split("=", 1)[0]: o for o in BASE + [f"output_dir={tmp_path / 'run'}"]}
    args.update({o.split("=", 1)[0]: o for o in case})
    return list(args.values())


@pytest.mark.parametrize("case,key", BAD, ids=[" ".join(c) for c, _ in BAD])
def test_bad_value_is_one_line_naming_the_key_and_exit_2(case, key, tmp_path, capsys):
    rc = main(argv(case, tmp_path))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {key}: "), lines[0]
    assert ", got " in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # nothing started


def test_env_name_error_lists_the_presets(tmp_path, capsys):
    assert main(argv(["env.name=atari"], tmp_path)) == 2
    line = capsys.readouterr().err.strip()
    assert "env.name" in line and "webqa" in line and "math" in line


def test_http_teacher_has_no_default_url():
    with pytest.raises(ConfigError, match="teacher.url"):
        resolve(BASE + ["teacher=http"])
    cfg, _ = resolve(BASE + ["teacher=http", "teacher.url=http://127.0.0.1:8001/v1"])
    assert cfg.teacher.url == "http://127.0.0.1:8001/v1"


@pytest.mark.parametrize("extra", [[], ["env.max_turns=null"], ["env.max_turns=1"], ["eval.questions=0"], ["temperature=0"],
                                   ["top_p=1"], ["keep_checkpoints=1"], ["teacher=none"], ["teacher=self"],
                                   ["method=ovd", "teacher=http", "teacher.url=https://example.org/v1"]])
def test_valid_values_still_resolve(extra):
    args = {o.split("=", 1)[0]: o for o in BASE}
    args.update({o.split("=", 1)[0]: o for o in extra})
    resolve(list(args.values()))


def test_resume_dir_overrides_are_validated_too(tmp_path, capsys):
    from distill.config import to_yaml

    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(*resolve(BASE)))
    assert main([f"resume={run}", "group_size=0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: group_size: an integer >= 1, got 0"]
    assert main([f"resume={tmp_path / 'nothing'}"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: resume: ") and "got" in line and "\n" not in line
