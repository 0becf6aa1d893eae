"""The retrieval server's micro-batcher: concurrent requests coalesced into one index call
(how and why: ``corpora.serve``'s docstring, "Micro-batching")."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from queue import Empty, Queue
from typing import Callable, Sequence


class _Job:
    __slots__ = ("queries", "k", "future")

    def __init__(self, queries: list[str], k: int):
        self.queries, self.k, self.future = queries, k, Future()


class MicroBatcher:
    """Coalesce concurrent ``submit`` calls into single ``search(queries, k)`` calls (one thread)."""

    _STOP = object()

    def __init__(self, search: Callable[[Sequence[str], int], list], max_batch: int = 512, max_wait_ms: float = 0.0,
                 max_results: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.search, self.max_batch, self.max_wait = search, max_batch, max_wait_ms / 1000.0
        self.max_results = max_results  # queries x k in one batch (None: no cap): bounds the hits held at once
        self._queue: Queue = Queue()
        self._carry: _Job | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.batches = 0
        self.batched_queries = 0
        self.batched_requests = 0
        self.max_seen = 0
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, queries: list[str], k: int, timeout: float | None = None) -> list:
        """Rows of hits for ``queries`` (blocks until the batch with them has run)."""
        if not queries:
            return []
        job = _Job(queries, k)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put(job)
        return job.future.result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(self._STOP)
        self._thread.join(timeout)

    def _next_batch(self) -> tuple[list[_Job], bool]:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is self._STOP:
            return [], True
        batch, n, k = [first], len(first.queries), first.k
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self._queue.get(timeout=left)
                except Empty:
                    break
            if job is self._STOP:
                return batch, True
            too_many = self.max_results is not None and (n + len(job.queries)) * max(k, job.k) > self.max_results
            if n + len(job.queries) > self.max_batch or too_many:
                self._carry = job  # first in the next batch
                break
            batch.append(job)
            n, k = n + len(job.queries), max(k, job.k)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop or self._carry is not None:
            if stop:  # a carried job after the stop marker: run it alone
                batch, self._carry = [self._carry], None
            else:
                batch, stop = self._next_batch()
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except Exception:
                # One bad request must not fail its batch-mates: run them one by one.
                for job in batch:
                    if not job.future.done():
                        try:
                            self._run_batch([job])
                        except Exception as exc:
                            job.future.set_exception(exc)
            batch = job = None  # do not hold the last batch's rows (MBs of passages) while waiting

    def _run_batch(self, batch: list[_Job]) -> None:
        queries = [q for job in batch for q in job.queries]
        rows = self.search(queries, max(job.k for job in batch))
        if len(rows) != len(queries):
            raise RuntimeError(f"search returned {len(rows)} rows for {len(queries)} queries")
        self.batches += 1
        self.batched_queries += len(queries)
        self.batched_requests += len(batch)
        self.max_seen = max(self.max_seen, len(queries))
        i = 0
        for job in batch:
            job.future.set_result([row[: job.k] for row in rows[i : i + len(job.queries)]])
            i += len(job.queries)

    def stats(self) -> dict:
        b = max(self.batches, 1)
        return {"batches": self.batches, "queries": self.batched_queries, "requests": self.batched_requests,
                "mean_queries_per_batch": round(self.batched_queries / b, 2),
                "mean_requests_per_batch": round(self.batched_requests / b, 2), "max_queries_in_batch": self.max_seen,
                "max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000.0}
