"""The question an episode is about, from ``reset``'s options: shared by every env in ``envs``.

``{"example": {"question", "answers", ...}}`` (a question of your own), ``{"question_id": id}``,
``{"index": i}`` (modulo the set's size), or none: drawn with the env's ``np_random``.
"""
from __future__ import annotations

from typing import Any

from corpora.qa import load_qa


def load_questions(dataset: str, limit: int | None) -> list[dict]:
    """An env's QA set (a name or a JSONL path, ``corpora.qa``); an empty one is an error."""
    questions = load_qa(dataset, limit=limit)
    if not questions:
        raise ValueError(f"QA set {dataset!r} has no questions")
    return questions


def pick_question(questions: list[dict], options: dict[str, Any] | None, np_random, dataset: str) -> dict:
    options = options or {}
    if "example" in options:
        ex = dict(options["example"])
        if not isinstance(ex.get("question"), str) or not ex.get("answers"):
            raise ValueError("options['example'] needs 'question' and 'answers'")
        ex["answers"] = [ex["answers"]] if isinstance(ex["answers"], str) else list(ex["answers"])
        ex.setdefault("id", "custom")
        return ex
    if "question_id" in options:
        matches = [q for q in questions if q["id"] == str(options["question_id"])]
        if not matches:
            raise KeyError(f"question id {options['question_id']!r} is not in {dataset!r}")
        return matches[0]
    if "index" in options:
        return questions[int(options["index"]) % len(questions)]
    return questions[int(np_random.integers(len(questions)))]
