"""Agent action text -> one structured action, or an invalid action with a clear reason.

Two protocols:

``tags`` (Search-R1 compatible)::

    <think>optional, ignored</think><search>query</search>
    <browse>Page title</browse>   <browse>Page title#2</browse>   <browse>https://en.wikipedia.org/wiki/Ed_Wood</browse>
    <answer>final answer</answer>

``tool_call`` (Hermes / Qwen2.5 style, JSON inside the tag; ``arguments`` may be an object or
a JSON string as in OpenAI's API)::

    <tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>
    <tool_call>{"name": "browse", "arguments": {"title": "...", "part": 2}}</tool_call>
    <tool_call>{"name": "answer", "arguments": {"answer": "..."}}</tool_call>

Exactly one action per turn. Parsing is a single linear scan (no backtracking regex), never
raises, and caps every size so a 1 MB action costs one pass over the text. Tool-call JSON goes
through :mod:`corpora.jsonguard` (depth, size and integer-length limits), so deep nesting or a
5,000-digit number is an invalid action, not an exception.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from corpora.jsonguard import JSONGuardError, loads as _json_loads

TOOLS = ("search", "browse", "answer")
PROTOCOLS = ("tags", "tool_call")

MAX_ACTION_CHARS = 20_000
MAX_QUERY_CHARS = 500
MAX_TITLE_CHARS = 300
MAX_ANSWER_CHARS = 500
MAX_JSON_DEPTH = 16  # tool-call JSON nesting (a call needs 2)
MAX_INT_DIGITS = 20  # digits of one integer in a tool call (a page part, a numeric query)

_TAG = re.compile(r"<(/?)(search|browse|answer|think|tool_call)\s*>", re.IGNORECASE)
_PART = re.compile(r"^(.*?)\s*#\s*(\d{1,6})$", re.DOTALL)

TOOL_SCHEMAS: list[dict] = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search Wikipedia with BM25. Returns the top passages with their titles.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "description": "Keywords or a question."}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "browse",
            "description": "Read a Wikipedia page by its exact title (or URL), one part at a time.",
            "parameters": {
                "type": "object",
                "properties": {
                    "title": {"type": "string", "description": "Page title as shown in search results."},
                    "part": {"type": "integer", "description": "Which part of the page to read (1 = start).", "minimum": 1},
                },
                "required": ["title"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "answer",
            "description": "Give the final answer (a short span: a name, date, number, yes or no). Ends the episode.",
            "parameters": {
                "type": "object",
                "properties": {"answer": {"type": "string", "description": "The final short answer."}},
                "required": ["answer"],
            },
        },
    },
]


@dataclass(frozen=True)
class Action:
    kind: str  # "search" | "browse" | "answer" | "invalid"
    arg: str = ""
    part: int = 1
    error: str = ""

    @property
    def valid(self) -> bool:
        return self.kind != "invalid"


def _invalid(reason: str) -> Action:
    return Action("invalid", error=reason)


def _short(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _check_arg(kind: str, arg: str) -> Action:
    arg = arg.strip()
    if not arg:
        return _invalid(f"empty {kind}: put the {'query' if kind == 'search' else 'title' if kind == 'browse' else 'answer'} inside the tag")
    if kind == "search":
        if len(arg) > MAX_QUERY_CHARS:
            return _invalid(f"search query too long ({len(arg)} characters; the limit is {MAX_QUERY_CHARS})")
        return Action("search", arg)
    if kind == "answer":
        if len(arg) > MAX_ANSWER_CHARS:
            return _invalid(f"answer too long ({len(arg)} characters; the limit is {MAX_ANSWER_CHARS}): give a short answer")
        return Action("answer", arg)
    part = 1
    m = _PART.match(arg)
    if m:  # "Title#2": read part 2 ('#' cannot occur in a Wikipedia title)
        arg, part = m.group(1).strip(), int(m.group(2))
    if not arg:
        return _invalid("empty browse: put a page title inside the tag")
    if len(arg) > MAX_TITLE_CHARS:
        return _invalid(f"page title too long ({len(arg)} characters; the limit is {MAX_TITLE_CHARS})")
    if part < 1:
        return _invalid("page part numbers start at 1")
    return Action("browse", arg, part=part)


def _spans(text: str) -> tuple[list[tuple[str, int, int]], str]:
    """Linear scan: complete (name, content_start, content_end) spans outside <think>, or an error."""
    spans: list[tuple[str, int, int]] = []
    open_name, open_end = "", 0
    for m in _TAG.finditer(text):
        closing, name = m.group(1) == "/", m.group(2).lower()
        if not open_name:
            if closing:
                return [], f"</{name}> without an opening <{name}>"
            open_name, open_end = name, m.end()
        elif closing and name == open_name:
            if name != "think":
                spans.append((name, open_end, m.start()))
            open_name = ""
        elif open_name == "think":
            continue  # anything inside <think> is free text
        elif open_name == "tool_call" and name != "tool_call":
            continue  # JSON may mention tag names
        else:
            return [], f"<{name}> inside <{open_name}>: close </{open_name}> first"
    if open_name and open_name != "think":
        return [], f"unclosed <{open_name}> tag: end it with </{open_name}>"
    return spans, ""


def parse_action(text: object, protocol: str = "tags") -> Action:
    """Parse one turn of agent text. Never raises; invalid input gives ``Action('invalid', error=...)``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown action protocol {protocol!r}; choose one of {PROTOCOLS}")
    if not isinstance(text, str):
        return _invalid(f"the action must be a string, got {type(text).__name__}")
    if len(text) > MAX_ACTION_CHARS:
        return _invalid(f"action too long ({len(text):,} characters; the limit is {MAX_ACTION_CHARS:,})")
    if not text.strip():
        return _invalid("empty action")
    spans, err = _spans(text)
    if err:
        return _invalid(err)
    wanted = ("tool_call",) if protocol == "tool_call" else TOOLS
    other = [n for n, _, _ in spans if n not in wanted]
    mine = [(n, a, b) for n, a, b in spans if n in wanted]
    if not mine:
        if other:
            hint = "use <tool_call>{...}</tool_call>" if protocol == "tool_call" else "use <search>, <browse> or <answer> tags, not <tool_call>"
            return _invalid(f"this environment uses the {protocol} protocol: {hint}")
        return _invalid(_no_action_hint(protocol))
    if len(mine) + len(other) > 1:
        names = ", ".join(n for n, _, _ in spans)
        return _invalid(f"several actions in one turn ({names}): give exactly one")
    name, a, b = mine[0]
    if protocol == "tags":
        return _check_arg(name, text[a:b])
    return _parse_tool_call(text[a:b])


def _no_action_hint(protocol: str) -> str:
    if protocol == "tool_call":
        return 'no tool call found: call one tool as <tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>'
    return "no action found: use <search>query</search>, <browse>title</browse> or <answer>answer</answer>"


_ARG_NAME = {"search": "query", "browse": "title", "answer": "answer"}


def _parse_tool_call(body: str) -> Action:
    try:
        call = _json_loads(body, max_bytes=MAX_ACTION_CHARS, max_depth=MAX_JSON_DEPTH, max_int_digits=MAX_INT_DIGITS)
    except JSONGuardError as exc:
        return _invalid(f"tool call is not valid JSON ({_short(str(exc), 80)}): {_short(body)!r}")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return _invalid('tool call must be a JSON object with a "name" and "arguments"')
    name = call["name"]
    if name not in TOOLS:
        return _invalid(f"unknown tool {_short(name, 40)!r}; the tools are {', '.join(TOOLS)}")
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = _json_loads(args, max_bytes=MAX_ACTION_CHARS, max_depth=MAX_JSON_DEPTH,
                               max_int_digits=MAX_INT_DIGITS) if args.strip() else {}
        except JSONGuardError as exc:
            return _invalid(f"arguments of {name} are not valid JSON ({_short(str(exc), 80)})")
    if not isinstance(args, dict):
        return _invalid(f"arguments of {name} must be a JSON object")
    key = _ARG_NAME[name]
    value = args.get(key)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        return _invalid(f'{name} needs a string argument "{key}"')
    action = _check_arg(name, str(value))
    if name == "browse" and action.valid and "part" in args:
        part = args["part"]
        if not isinstance(part, int) or isinstance(part, bool) or part < 1:
            return _invalid('browse "part" must be a whole number >= 1')
        action = Action("browse", action.arg, part=part)
    return action
