"""QA sets by name or by path, in one record schema.

Record: ``{"id", "question", "answers": [str, ...], "dataset", "split", ...extras}``; extras
such as ``supporting_titles`` are kept. User files load by path in the same JSONL schema or
FlashRAG's (``golden_answers`` instead of ``answers``; ``answer`` as one string works too).

Names (``name`` or ``name:split``). The default split of each name is the one the bundled
corpus covers where there is one, so ``WebQA-HotpotQA-v0`` is answerable offline:

======================  =====================================  =======  ============
name                    file (``corpora/data``)                records  in corpus
======================  =====================================  =======  ============
hotpotqa (:dev_subset)  hotpotqa_dev_distractor_subset          500     all 10 paras
hotpotqa:dev            hotpotqa_dev                           7,405    500 of them
hotpotqa:train          hotpotqa_train_sample                    100     yes
nq (:test)              nq_test                                3,610    no
triviaqa (:test)        triviaqa_test                         11,313    no
triviaqa:dev            triviaqa_dev                           8,837    no
popqa (:test)           popqa_test_hipporag2_1000              1,000    gold paras
popqa:test_2000         popqa_test_modelcollab_2000            2,000    no
2wikimultihopqa (:dev)  2wikimultihopqa_dev                   12,576    no
musique (:dev)          musique_dev                            2,417    no
musique:train           musique_train_sample                     100     yes
bamboogle (:test)       bamboogle_test                           125    no
gsm8k (:test)           gsm8k_test                             1,319    (math)
gsm8k:train             gsm8k_train                            7,473    (math)
math500 (:test)         math500_test                             500    (math)
======================  =====================================  =======  ============

Origins and licences: ``corpora/data/SOURCES.md``.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from corpora.corpus import data_path, open_text

QA_FILES: dict[str, dict[str, str]] = {
    "hotpotqa": {"dev_subset": "hotpotqa_dev_distractor_subset", "dev": "hotpotqa_dev", "train": "hotpotqa_train_sample"},
    "nq": {"test": "nq_test"},
    "triviaqa": {"test": "triviaqa_test", "dev": "triviaqa_dev"},
    "popqa": {"test": "popqa_test_hipporag2_1000", "test_2000": "popqa_test_modelcollab_2000"},
    "2wikimultihopqa": {"dev": "2wikimultihopqa_dev"},
    "musique": {"dev": "musique_dev", "train": "musique_train_sample"},
    "bamboogle": {"test": "bamboogle_test"},
    "gsm8k": {"test": "gsm8k_test", "train": "gsm8k_train"},
    "math500": {"test": "math500_test"},
}
DEFAULT_SPLIT = {name: next(iter(splits)) for name, splits in QA_FILES.items()}
ALIASES = {"2wiki": "2wikimultihopqa", "hotpot": "hotpotqa", "trivia": "triviaqa", "math": "math500"}
QA_SUITE = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")


def _normalise(rec: dict, source: str, lineno: int) -> dict:
    out = dict(rec)
    if "answers" not in out:
        if "golden_answers" in out:
            out["answers"] = out.pop("golden_answers")
        elif "answer" in out:
            out["answers"] = out.pop("answer")
    answers = out.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{source}:{lineno + 1}: record needs 'answers' (or 'golden_answers') as a non-empty list of strings")
    if not isinstance(out.get("question"), str) or not out["question"].strip():
        raise ValueError(f"{source}:{lineno + 1}: record needs a non-empty 'question' string")
    out["answers"] = answers
    out["id"] = str(out.get("id", out.get("_id", f"{Path(source).stem}_{lineno}")))
    out.setdefault("dataset", Path(source).name.split(".")[0])
    out.setdefault("split", "")
    return out


def read_qa_file(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"QA file not found: {path}")
    out = []
    with open_text(path) as fh:
        for lineno, line in enumerate(fh):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno + 1}: not valid JSON ({exc.msg})") from None
                out.append(_normalise(rec, str(path), lineno))
    return out


def resolve_qa_name(name: str) -> tuple[str, str]:
    """``"hotpotqa:dev"`` -> ("hotpotqa", "dev"), with defaults and aliases; clear error if unknown."""
    base, _, split = name.partition(":")
    base = ALIASES.get(base.lower(), base.lower())
    if base not in QA_FILES:
        raise KeyError(f"unknown QA set {name!r}; known names: {sorted(QA_FILES)} (or give a file path)")
    split = split or DEFAULT_SPLIT[base]
    if split not in QA_FILES[base]:
        raise KeyError(f"QA set {base!r} has splits {sorted(QA_FILES[base])}, not {split!r}")
    return base, split


@lru_cache(maxsize=32)
def _load_cached(name_or_path: str) -> tuple[dict, ...]:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".jsonl", ".gz", ".json") and path.exists():
        return tuple(read_qa_file(path))
    base, split = resolve_qa_name(name_or_path)
    return tuple(read_qa_file(data_path(QA_FILES[base][split] + ".jsonl.gz")))


def load_qa(name_or_path: str, limit: int | None = None) -> list[dict]:
    """Records of a named QA set (``"nq"``, ``"hotpotqa:train"``, ...) or a JSONL file path."""
    recs = _load_cached(str(name_or_path))
    return [dict(r) for r in (recs[:limit] if limit else recs)]
