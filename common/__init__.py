"""Small utilities every layer shares; the lowest layer, it imports no other package of this project.

* :mod:`common.files` - the cache root, inter-process file locks, atomic writes, whole-folder publishes.
* :mod:`common.httpserver` - the hardened HTTP server base (:class:`~common.httpserver.GuardedServer`,
  :class:`~common.httpserver.GuardedHandler`) under ``corpora.serve`` and ``agents.openai_server``.
* :mod:`common.subprocess_server` - a ``python -m`` server in a subprocess on a free port, for tests
  and benchmarks (:class:`~common.subprocess_server.SubprocessServer`, :func:`~common.subprocess_server.free_port`).

Nothing is imported here, so ``import common.files`` stays as cheap as its standard-library imports.
"""
