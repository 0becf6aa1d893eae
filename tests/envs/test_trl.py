"""WebQA inside TRL (envs/trl.py, distill/trl_reward.py): the tool env on its own, then TRL's
GRPOTrainer for 2 steps with environment_factory on a tiny random model on CPU."""
import inspect

import pytest

from envs.grading import grade
from envs.trl import WebQAToolEnv, em_reward, f1_reward

ROW = {"id": "q1", "question": "Were Scott Derrickson and Ed Wood of the same nationality?", "answers": ["yes"],
       "supporting_titles": ["Scott Derrickson", "Ed Wood"]}


@pytest.fixture(scope="module")
def env():
    return WebQAToolEnv(top_k=1, passage_chars=120)


def test_public_methods_are_exactly_the_tools():
    # TRL turns every public function of the class (but reset/get_reward) into a tool
    public = {n for n, _ in inspect.getmembers(WebQAToolEnv, predicate=inspect.isfunction) if not n.startswith("_")}
    assert public == {"reset", "search", "browse", "answer"}


def test_tools_step_the_env_and_rewards_are_the_graders(env):
    assert env.reset(prompt=[{"role": "user", "content": "..."}], **ROW) is None  # the row's prompt is used
    found = env.search("Scott Derrickson")
    assert found.startswith("Doc 1 (Title: Scott Derrickson)") and "<tool_response>" not in found
    assert env.browse("Ed Wood").startswith("Page: Ed Wood (part 1 of")
    assert env.browse("No Such Page Title Xyz").startswith("Error: no page titled")
    assert env.answer("Yes.") == "Answer recorded: Yes.\nThe episode is over."
    assert env.search("more").startswith("Error: the episode is over")  # not counted
    assert len(env.actions) == 4 and env.done
    assert env.info["searches"] == ["Scott Derrickson"] and env.info["invalid_actions"] == 0
    assert em_reward(completions=[[]], environments=[env]) == [grade("Yes.", ["yes"]).em] == [1.0]


def test_open_episode_is_answered_by_the_final_message(env):
    prompt = env.reset(question="Capital of France?", answers="Paris")
    assert "Question: Capital of France?" in prompt  # no prompt column: reset gives the instructions
    last = {"role": "assistant", "content": "<think>the capital</think> Paris, France"}
    assert f1_reward(completions=[[last]], environments=[env]) == [grade("Paris, France", ["Paris"]).f1]
    assert env.final_answer == "Paris, France"
    env.reset(**ROW)
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "search"}}]}
    assert em_reward(completions=[[call]], environments=[env]) == [0.0] and env.final_answer is None
    with pytest.raises(ValueError, match="environment_factory"):
        em_reward(completions=[[]], environments=None)


def test_verbal_reward_adapter(env):
    from distill.trl_reward import verbal_reward

    env.reset(**ROW)
    env.answer("yes")
    logged = {}
    reward = verbal_reward(ScriptedGrader())
    assert reward(completions=[[]], environments=[env], log_metric=logged.__setitem__) == [1.0]
    assert logged["verbal/teacher_requests"] == 1.0


class ScriptedGrader:
    """A teacher that scores 9 when the final answer shown equals a gold answer, else 0."""
    capabilities = frozenset({"score"})

    def score(self, messages, sample=False, seed=0):
        out = []
        for msgs in messages:
            lines = dict(line.split(": ", 1) for line in msgs[-1]["content"].splitlines() if ": " in line)
            gold = lines.get("Gold answer(s)", "").split(" | ")
            answer = lines.get("Agent's final answer", "")
            out.append(f"Score: {9 if grade(answer, gold).em else 0}")
        return out


def steering_bias(tokenizer, turns):
    """``GenerationConfig.sequence_bias`` entries that make sampling follow a script: for each
    (anchor, text, bias), every prefix of ``text`` preceded by ``anchor`` biases its next token.
    Later turns get larger biases, so a longer (more specific) anchor wins where several match."""
    out = []
    for anchor, text, bias in turns:
        a, t = tokenizer.encode(anchor, add_special_tokens=False), tokenizer.encode(text, add_special_tokens=False)
        out += [[a + t[: i + 1], bias] for i in range(len(t))]
    return out


@pytest.mark.slow
def test_grpo_trainer_two_steps_with_webqa_tools(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import torch
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen2_5_chat_template

    from agents.tiny import byte_tokenizer, tiny_random_model
    from distill.trl_reward import verbal_reward
    from envs.trl import build_dataset

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template  # tools-capable; TRL knows its tool-call parser
    model, tokenizer = tiny_random_model(tokenizer)
    model.config.max_position_embeddings = 8192  # the tool schemas alone are ~1,500 byte tokens
    # A random model never calls tools by itself: a sequence bias steers its sampling through a
    # scripted episode (search, answer, a closing message). Generation, tool-call parsing, the
    # tool loop, rewards and the update are TRL's own.
    end = "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    bias = steering_bias(tokenizer, [
        ("<|im_start|>assistant\n", '<tool_call>\n{"name": "search", "arguments": {"query": "Scott Derrickson"}}\n</tool_call><|im_end|>', 1e2),
        (end, '<tool_call>\n{"name": "answer", "arguments": {"answer": "yes"}}\n</tool_call><|im_end|>', 1e3),
        ("The episode is over.\n" + end, "Done.<|im_end|>", 1e4),
    ])
    made = []

    def factory():
        made.append(WebQAToolEnv(top_k=1, passage_chars=120))
        return made[-1]

    graded = []

    def em(completions=None, environments=None, **kwargs):  # em_reward, recording what it scored
        rewards = em_reward(completions=completions, environments=environments, **kwargs)
        graded.append([(env.final_answer, env.gold_answers, r) for env, r in zip(environments, rewards)])
        return rewards

    em.__name__ = "em_reward"
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=2,
        max_completion_length=1024, max_tool_calling_iterations=3, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
        generation_kwargs={"sequence_bias": bias},
    )
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=build_dataset(limit=2),
                          reward_funcs=[em, f1_reward, verbal_reward(ScriptedGrader())], environment_factory=factory)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)

    # the tools were called, through TRL's loop, on our env
    used = [e for e in made if e.actions]
    assert len(used) == 2  # one instance per rollout (2 generations), reused across steps
    for e in used:
        assert [a.split('"')[3] for a in e.actions] == ["search", "answer"]
        assert e.observations[0].startswith("Doc 1 (Title: Scott Derrickson)")
        assert e.info["searches"] == ["Scott Derrickson"] and e.final_answer == "yes"
    logs = [h for h in trainer.state.log_history if "rewards/em_reward/mean" in h]
    assert len(logs) == 2
    assert all(h["tools/call_frequency"] == 2.0 and h["tools/failure_frequency"] == 0.0 for h in logs)
    # the rewards TRL logged are our grader's, step by step
    assert len(graded) == 2
    for step, log in zip(graded, logs):
        assert [r for _, _, r in step] == [grade(a, gold).em for a, gold, _ in step]
        mean = sum(r for _, _, r in step) / len(step)
        assert log["rewards/em_reward/mean"] == pytest.approx(mean)
        assert log["rewards/f1_reward/mean"] == pytest.approx(sum(grade(a, g).f1 for a, g, _ in step) / len(step))
        assert log["rewards/verbal_reward/mean"] == pytest.approx(mean)  # the scripted grader agrees with EM
    assert sorted(log["rewards/em_reward/mean"] for log in logs) == [0.0, 1.0]  # one gold is "yes", one is not
