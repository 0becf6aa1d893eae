"""Math answer extraction and grading for ``Math-v0``. Pure functions, no model code.

Extraction (``extract_answer``), in this order, the *last* occurrence of each:

1. ``\\boxed{...}`` (also ``\\fbox{...}``), braces balanced: the usual convention ("put the final
   answer in \\boxed{}") and what the default prompt asks for;
2. ``<answer>...</answer>``, the web-QA action tag;
3. GSM8K's ``#### <answer>`` line.

A reply with none of them is an extraction failure: reward 0, ``info["extracted"] = False``.

Equality (``is_equivalent``): Hugging Face's ``math-verify`` (with ``latex2sympy2-extended``)
parses gold and prediction as LaTeX or plain expressions and compares them symbolically:
numbers (``72`` = ``72.0``, ``1,000`` = ``1000``), fractions (``\\frac12`` = ``0.5``), tuples,
sets, intervals, polynomials, ``\\text{(C)}`` = ``C``. Where the library cannot parse one side
(it returns nothing), a light string normaliser decides instead, and the result says so
(``how == "fallback"``) so that its use is counted. Every call has a time limit: the library's
own ``signal.alarm`` on the main thread; elsewhere (where ``signal`` cannot be used) a worker
process that is killed and replaced when it overruns. A timeout grades the answer wrong
(``how == "timeout"``).
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

MAX_ANSWER_CHARS = 1000  # a longer "answer" is not a final answer; graded wrong without parsing

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_HASHES = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` with balanced braces, or None (none, or unclosed)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                i += 2  # an escaped brace \{ does not count
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
    return None


def extract_answer(text: str) -> tuple[str | None, str]:
    """(answer, where it came from: ``boxed`` | ``answer_tag`` | ``hashes`` | ``none``)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip(), "answer_tag"
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip(), "hashes"
    return None, "none"


_STRIP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\s+")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")


def normalise(ans: str) -> str:
    """The light fallback: drop ``$``, spaces, ``\\left``/``\\right`` and ``\\text{}`` wrappers,
    thousands separators and a trailing period; ``\\dfrac`` -> ``\\frac``; ``5.0`` -> ``5``."""
    s = _TEXT.sub(r"\1", ans)
    s = _STRIP.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".").lower()
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    return s


@dataclass(frozen=True)
class Verdict:
    correct: bool
    how: str  # math_verify | fallback | timeout | too_long


def _parse(text: str, timeout: int | None) -> list:
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return parse(f"${text}$", parsing_timeout=timeout, raise_on_error=True, fallback_mode="no_fallback")
    except TimeoutException:
        raise
    except Exception:  # noqa: BLE001 - the library cannot parse it: the fallback decides
        return []


def _verify(gold: str, pred: str, timeout: int | None) -> Verdict:
    """One comparison; raises math_verify's TimeoutException when ``timeout`` runs out."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    g, p = _parse(gold, timeout), _parse(pred, timeout)
    if not g or not p:
        return Verdict(normalise(gold) == normalise(pred), "fallback")
    try:
        return Verdict(bool(verify(g, p, timeout_seconds=timeout, raise_on_error=True)), "math_verify")
    except TimeoutException:
        raise
    except Exception:  # noqa: BLE001 - the library failed on a parsed pair: graded wrong by it
        return Verdict(False, "math_verify")


STARTUP_TIMEOUT = 120.0  # seconds for a new grading worker to import its libraries


class _Worker:
    """One long-lived grading process (``python -m envs.math_grading``, JSON lines over pipes) for
    calls off the main thread, where ``signal.alarm`` cannot time them; killed and replaced when
    a comparison overruns."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None

    def _start(self) -> None:
        import subprocess
        import sys

        import select

        self.proc = subprocess.Popen([sys.executable, "-m", "envs.math_grading"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        # the worker says "ready" once sympy and math-verify are imported, so that a comparison's
        # timeout never has to cover the start-up (up to a minute on a loaded machine)
        ready, _, _ = select.select([self.proc.stdout], [], [], STARTUP_TIMEOUT)
        if not ready or self.proc.stdout.readline().strip() != '"ready"':
            self._kill()
            raise OSError("the math grading worker did not start")

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __call__(self, gold: str, pred: str, timeout: float) -> Verdict:
        import json
        import select

        with self.lock:
            try:
                if self.proc is None or self.proc.poll() is not None:
                    self._start()
                self.proc.stdin.write(json.dumps([gold, pred]) + "\n")
                self.proc.stdin.flush()
                ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
                line = self.proc.stdout.readline() if ready else ""
                correct, how = json.loads(line)
            except (OSError, ValueError):  # overran, died or answered garbage: graded wrong, worker replaced
                self._kill()
                return Verdict(False, "timeout")
            return Verdict(bool(correct), str(how))


def _serve() -> None:  # the worker's loop: its main thread, so no signal timeouts are needed
    import json
    import sys

    import math_verify  # noqa: F401 - imported before "ready": a comparison's timeout excludes start-up

    _verify("1", "1", None)  # and sympy's first parse
    sys.stdout.write('"ready"\n')
    sys.stdout.flush()
    for line in sys.stdin:
        gold, pred = json.loads(line)
        try:
            v = _verify(gold, pred, None)
        except Exception:  # noqa: BLE001 - a grading error grades wrong, never kills the worker
            v = Verdict(False, "math_verify")
        sys.stdout.write(json.dumps([v.correct, v.how]) + "\n")
        sys.stdout.flush()


_WORKER = _Worker()


def is_equivalent(pred: str, golds, timeout: int = 5) -> Verdict:
    """Whether ``pred`` equals any of the gold answers (``golds``: str or list of str)."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    if len(pred) > MAX_ANSWER_CHARS:
        return Verdict(False, "too_long")
    verdicts = []
    for gold in golds:
        if threading.current_thread() is threading.main_thread():
            from math_verify.errors import TimeoutException

            try:
                v = _verify(gold, pred, timeout)
            except TimeoutException:
                v = Verdict(False, "timeout")
        else:
            v = _WORKER(gold, pred, timeout)
        if v.correct:
            return v
        verdicts.append(v)
    # wrong against every gold: report the weakest way it was decided
    for how in ("timeout", "fallback"):
        if any(v.how == how for v in verdicts):
            return Verdict(False, how)
    return verdicts[0] if verdicts else Verdict(False, "math_verify")


if __name__ == "__main__":
    _serve()
