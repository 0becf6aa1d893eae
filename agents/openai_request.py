"""What one request to ``agents.openai_server`` may ask for and how it waits: the caps
(:class:`ServerLimits`, each a command-line flag, and the fixed bounds on temperature, stop
strings and seeds), the client error :class:`BadRequest` (400, or its ``status``), and
:class:`Waiter`, which cancels a request's model jobs when its client goes away, its deadline
passes or the server stops (:class:`Cancelled`)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Callable

JSON_DEPTH = 32  # nesting allowed in a request body (chat tools carry JSON schemas)
MIN_TEMPERATURE = 0.01  # below it (but above 0, greedy) logits / temperature overflow: vLLM clamps there too
MAX_TEMPERATURE = 100.0
MAX_STOP_CHARS = 1000
INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass
class ServerLimits:
    """What one request may ask for (each is a command-line flag)."""

    max_body_bytes: int = 8 << 20
    max_prompt_chars: int | None = None  # default: 32 x max_prompt_tokens
    max_prompt_tokens: int | None = None  # default: the model's context
    max_model_len: int | None = None  # default: config.max_position_embeddings
    max_new_tokens: int = 4096
    max_prompts: int = 64
    max_n: int = 8
    max_stop: int = 16
    max_logprobs: int = 20
    request_timeout: float = 600.0

    def resolved(self, model) -> "ServerLimits":
        """These limits with the defaults that depend on the model filled in."""
        ctx = self.max_model_len or int(getattr(model.config, "max_position_embeddings", 0) or 0) or 8192
        tokens = min(self.max_prompt_tokens or ctx, ctx)
        return replace(self, max_model_len=ctx, max_prompt_tokens=tokens, max_prompt_chars=self.max_prompt_chars or 32 * tokens)


class BadRequest(ValueError):
    """A client error: the server answers 400 (or ``status``) with this message."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class Cancelled(Exception):
    """A request stopped before its answer: the client went away (``status`` 0: nothing to send),
    its deadline passed or the server is stopping (503)."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


@dataclass
class Waiter:
    """How a request waits for the model worker: it polls, and on ``gone()`` (the client closed
    its connection), past ``deadline`` (``time.monotonic()``) or once ``stopping`` is set it
    cancels the job and raises :class:`Cancelled`. The default waits as long as it takes."""

    deadline: float | None = None
    timeout: float | None = None  # for the message
    gone: Callable[[], bool] = lambda: False
    stopping: threading.Event | None = None

    def check(self) -> None:
        if self.gone():
            raise Cancelled("the client closed the connection", status=0)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Cancelled(f"the request took longer than its deadline of {self.timeout:g} s (--request-timeout)")
        if self.stopping is not None and self.stopping.is_set():
            raise Cancelled("the server is shutting down")

    def wait(self, fut: Future, cancel: threading.Event | None = None):
        while True:
            try:
                return fut.result(timeout=0.05)
            except FutureTimeout:
                pass
            try:
                self.check()
            except Cancelled:
                if cancel is not None:
                    cancel.set()  # a running job stops at its next decode step
                fut.cancel()  # a queued one never runs
                raise
