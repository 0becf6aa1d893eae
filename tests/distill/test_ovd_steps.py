"""ovd on a one-turn env (Math-v0): the steps of the student's solution are scored prefix by
prefix; the accepted steps are kept token for token and the teacher continues the solution from
there, in the same turn (OVD v2's suffix resampling at step granularity). Sources are marked
token by token; the outcome reward is the mixed solution's."""
import gymnasium as gym

import envs  # noqa: F401
from agents.hf_policy import TransformersPolicy
from agents.models import tiny_random_model
from agents.policy import Completion, SamplingParams, TokenizerPolicy
from agents.rollout import SOURCE_STUDENT, SOURCE_TEACHER, rollout
from distill.methods.ovd import OVDConfig, kept_tokens, prepare, split_steps, use_steps
from distill.teachers.local import LocalTeacher

QID = "gsm8k_test_0"  # Janet's ducks; the answer is 18
STUDENT = "Janet's ducks lay 16 eggs a day.\n\nShe eats 3 and bakes 4, so 16 - 3 - 4 = 10 remain.\n\nSo she makes \\boxed{20}."
TEACHER = "She eats 3 and bakes 4, so 9 eggs remain.\n\nAt $2 each that is \\boxed{18}."


class Fixed(TokenizerPolicy):
    """A student that writes ``text`` every time (its log-probs: -1 per token)."""

    def __init__(self, tokenizer, text):
        self.tokenizer, self.text = tokenizer, text

    def generate(self, prompts, sampling, contexts=None):
        ids = self.encode(self.text)
        return [Completion(ids, [-1.0] * len(ids), self.decode(ids), "eos") for _ in prompts]


class StepTeacher:
    """Accepts the first step, rejects any prefix with the wrong subtraction; a finished solution
    scores 0; acts by chat with ``TEACHER``. Records what it was shown."""

    name, tokenizer = "steps", None
    capabilities = frozenset({"score", "score_distribution", "act"})

    def __init__(self):
        self.shown, self.asked = [], []

    def _digit(self, msgs):
        text = msgs[-1]["content"]
        self.shown.append(text)
        if "solution so far" not in text:
            return 0
        return 2 if "= 10" in text else 8

    def score_distribution(self, messages):
        return [[1.0 if d == digit else 0.0 for d in range(10)] for digit in map(self._digit, messages)]

    def score(self, messages, sample=False, seed=0):
        return [f"Score: {self._digit(m)}" for m in messages]

    def chat(self, messages, sampling):
        self.asked.extend(messages)
        return [TEACHER for _ in messages]


class Ctx:
    def __init__(self, policy, roll, group_size=1):
        self.policy, self.rollout, self.seed, self.state, self.group_size = policy, roll, 0, {}, group_size


def math_roll(policy):
    make_env = lambda: gym.make("Math-v0")  # noqa: E731

    def roll(pol, opts, g=1):
        return rollout(pol, make_env, opts, g, SamplingParams(seed=1), 200, 2048, seed=1, with_privileged=True)

    return roll, roll(policy, [{"question_id": QID}], 1)


def test_split_steps_keeps_the_text_and_caps_the_count():
    steps = split_steps(STUDENT, 8)
    assert len(steps) == 3 and "".join(steps) == STUDENT and steps[0].endswith("\n\n")
    many = "\n\n".join(f"step {k}" for k in range(20))
    assert len(split_steps(many, 8)) <= 8 and "".join(split_steps(many, 8)) == many
    assert split_steps("one line", 8) == ["one line"]


def test_accepted_steps_are_kept_and_the_chat_teacher_continues_the_solution():
    _, tok = tiny_random_model("small", seed=0)
    student = Fixed(tok, STUDENT)
    roll, trajs = math_roll(student)
    assert trajs[0].reward == 0.0 and trajs[0].info["max_turns"] == 1
    assert use_steps(trajs, OVDConfig()) and not use_steps(trajs, OVDConfig(prefix="turn"))
    teacher = StepTeacher()
    sig = prepare(trajs, teacher, OVDConfig(threshold=5), Ctx(student, roll))
    # step 1 accepted (8), step prefix 2 rejected (2): never the whole solution
    assert len(teacher.shown) == 2 and all("solution so far" in s for s in teacher.shown)
    assert sig.metrics["kept_steps"] == 1 and sig.metrics["accept_rate"] == 0.0
    new = sig.trajectories[0]
    head = split_steps(STUDENT, 8)[0]
    assert new.actions[0].startswith(head) and new.actions[0].endswith("\\boxed{18}.")
    assert new.reward == 1.0 and new.info["grader"] == "math_verify"  # the mixed solution's outcome
    m = kept_tokens(student, trajs[0].completion_ids, head)
    assert new.completion_ids[:m] == trajs[0].completion_ids[:m]  # the student's first step, token for token
    assert new.sources == [SOURCE_STUDENT] * m + [SOURCE_TEACHER] * (len(new.completion_ids) - m)
    assert new.logprobs[:m] == [-1.0] * m  # the student's sampling log-probs are kept for its tokens
    assert head.strip() in teacher.asked[0][-1]["content"]  # the teacher was asked to continue it
    assert sig.metrics["teacher_tokens"] == len(new.completion_ids) - m
    assert sig.train_masks[0] == [1] * len(new.completion_ids)  # default: teacher tokens train too
    masked = prepare(trajs, StepTeacher(), OVDConfig(threshold=5, train_on_teacher_tokens=False), Ctx(student, roll))
    assert masked.train_masks[0] == [1] * m + [0] * (len(masked.trajectories[0].completion_ids) - m)


def test_a_wrong_first_step_hands_the_whole_solution_to_the_teacher():
    _, tok = tiny_random_model("small", seed=0)
    student = Fixed(tok, "16 - 3 - 4 = 10\n\n\\boxed{20}")
    roll, trajs = math_roll(student)
    sig = prepare(trajs, StepTeacher(), OVDConfig(threshold=5), Ctx(student, roll))
    new = sig.trajectories[0]
    assert sig.metrics["kept_steps"] == 0 and set(new.sources) == {SOURCE_TEACHER} and new.reward == 1.0


def test_all_steps_accepted_keeps_the_student_solution():
    _, tok = tiny_random_model("small", seed=0)
    student = Fixed(tok, "Janet has 16 eggs.\n\nSo \\boxed{18}")

    class Generous(StepTeacher):
        def _digit(self, msgs):
            super()._digit(msgs)
            return 9

    roll, trajs = math_roll(student)
    teacher = Generous()
    sig = prepare(trajs, teacher, OVDConfig(threshold=5), Ctx(student, roll))
    assert sig.trajectories[0] is trajs[0] and sig.metrics["accept_rate"] == 1.0
    assert len(teacher.shown) == 2 and "solution so far" not in teacher.shown[-1]  # the last prefix is the whole


def test_exact_ids_teacher_continues_the_students_own_tokens():
    """A local teacher with the student's tokenizer continues from the kept ids themselves."""
    model, tok = tiny_random_model("small", seed=0)
    tmodel, _ = tiny_random_model("small", seed=1)
    student = Fixed(tok, STUDENT)
    student.tokenizer = tok
    roll, trajs = math_roll(student)

    class Local(LocalTeacher):
        def score_distribution(self, messages):
            return StepTeacher().score_distribution(messages)

    teacher = Local(tmodel, tok, name="t")
    ctx = Ctx(TransformersPolicy(model, tok), roll)
    ctx.policy = student  # the student's tokenizer and ids; the teacher's policy() acts
    student.tokenizer = tok
    sig = prepare(trajs, teacher, OVDConfig(threshold=5, teacher_temperature=0.0), ctx)
    new = sig.trajectories[0]
    m = kept_tokens(student, trajs[0].completion_ids, split_steps(STUDENT, 8)[0])
    assert 0 < m < len(new.completion_ids)
    assert new.completion_ids[:m] == trajs[0].completion_ids[:m]
    assert new.sources[:m] == [SOURCE_STUDENT] * m and set(new.sources[m:]) == {SOURCE_TEACHER}
