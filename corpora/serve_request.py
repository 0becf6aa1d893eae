"""The retrieval server's request protocol: what one ``POST /retrieve`` may ask (:class:`Limits`),
its parsing and checks (:func:`parse_request`, 400 or 413 as :class:`RequestError`) and the
Search-R1 response body (:func:`format_result`). The API itself is in ``corpora.serve``'s docstring."""
from __future__ import annotations

from dataclasses import dataclass

from corpora.jsonguard import JSONGuardError
from corpora.jsonguard import loads as guarded_loads


@dataclass
class Limits:
    max_queries: int = 256  # queries in one request
    max_query_chars: int = 4096  # characters in one query
    max_body_bytes: int = 1 << 20  # request body
    max_topk: int = 100
    default_topk: int = 3
    max_results: int = 4096  # queries x topk in one request: bounds the response (a few MB)


JSON_DEPTH = 16  # nesting allowed in a request body (a valid one needs 2)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_request(body: bytes, limits: Limits) -> tuple[list[str], int, bool]:
    """A /retrieve body -> (queries, topk, return_scores), or RequestError(400, why)."""
    try:
        req = guarded_loads(body, max_bytes=limits.max_body_bytes, max_depth=JSON_DEPTH)
    except JSONGuardError as exc:
        raise RequestError(400 if len(body) <= limits.max_body_bytes else 413, str(exc)) from None
    if not isinstance(req, dict):
        raise RequestError(400, 'request must be a JSON object {"queries": [...], "topk": k, "return_scores": bool}')
    unknown = sorted(set(req) - {"queries", "topk", "return_scores"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; expected queries, topk, return_scores")
    queries = req.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise RequestError(400, "'queries' must be a list of strings")
    if len(queries) > limits.max_queries:
        raise RequestError(413, f"too many queries: {len(queries)} > {limits.max_queries} per request; split the batch")
    for i, q in enumerate(queries):
        if len(q) > limits.max_query_chars:
            raise RequestError(400, f"query {i} has {len(q)} characters, over the limit of {limits.max_query_chars}")
    topk = req.get("topk")
    if topk is None:
        topk = limits.default_topk
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise RequestError(400, f"'topk' must be an integer, got {type(topk).__name__}")
    if not 1 <= topk <= limits.max_topk:
        raise RequestError(400, f"'topk' must be between 1 and {limits.max_topk}, got {topk}")
    if len(queries) * topk > limits.max_results:
        raise RequestError(413, f"{len(queries)} queries x topk {topk} = {len(queries) * topk} results is over the limit "
                                f"of {limits.max_results} per request (--max-results); split the batch or lower topk")
    scores = req.get("return_scores", False)
    if not isinstance(scores, bool):
        raise RequestError(400, f"'return_scores' must be true or false, got {type(scores).__name__}")
    return queries, topk, scores


def format_result(rows, return_scores: bool) -> dict:
    """Hits -> Search-R1's response body."""
    out = []
    for hits in rows:
        docs = [{"id": h.doc_id, "contents": f'"{h.title}"\n{h.text}'} for h in hits]
        out.append([{"document": d, "score": h.score} for d, h in zip(docs, hits)] if return_scores else docs)
    return {"result": out}
