"""common.subprocess_server: a tiny GuardedServer run as ``python -m`` in a subprocess starts on
a free port, answers /health, and exits 0 on SIGTERM (stop_on_signals); one that dies at start-up
is an error that quotes its log."""
from __future__ import annotations

import os
import socket
import urllib.request

import pytest

from common.subprocess_server import SubprocessServer, free_port

TINY = '''
import argparse, logging, sys
from common.httpserver import GuardedHandler, GuardedServer, stop_on_signals

class H(GuardedHandler):
    routes = {"/health": ("GET",)}
    def do_GET(self):
        if self.route("GET"):
            self.send_json(200, {"ok": True})

ap = argparse.ArgumentParser()
ap.add_argument("--host"); ap.add_argument("--port", type=int)
args = ap.parse_args()
try:
    srv = GuardedServer((args.host, args.port), H)
except OSError:
    sys.exit(3)
stop_on_signals(srv, logging.getLogger("tiny"), "finishing")
srv.serve_forever()
srv.server_close()
'''


class Tiny(SubprocessServer):
    module = "tiny_guarded_server"
    what = "tiny server"


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tmp_path)  # SubprocessServer puts the project root in front
    return env


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_starts_answers_and_stops_cleanly(tmp_path):
    (tmp_path / "tiny_guarded_server.py").write_text(TINY)
    with Tiny([], env=_env(tmp_path), startup_timeout=30, log_path=tmp_path / "log") as srv:
        with urllib.request.urlopen(srv.base + "/health", timeout=5) as r:
            assert r.status == 200
        proc = srv.proc
    assert proc.returncode == 0


def test_a_server_that_dies_at_start_up_is_an_error(tmp_path):
    (tmp_path / "tiny_guarded_server.py").write_text("import sys\nprint('no index here')\nsys.exit(1)\n")
    srv = Tiny([], env=_env(tmp_path), startup_timeout=30, log_path=tmp_path / "log")
    with pytest.raises(RuntimeError, match="tiny server exited with 1.*no index here"):
        srv.start()
