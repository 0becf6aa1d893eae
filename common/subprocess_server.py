"""A server run as ``python -m ...`` in a subprocess on a free loopback port, for tests and
benchmarks: :class:`SubprocessServer` (``corpora.serve.ServerProcess`` and
``agents.openai_server.ModelServerProcess`` derive from it) and :func:`free_port`."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SubprocessServer:
    """``python -m {module} {args} --host 127.0.0.1 --port PORT {extra_args}`` in a subprocess,
    on a free loopback port unless ``port`` is given; a context manager (``start()`` on entry,
    ``stop()`` on exit). ``start()`` waits for ``GET /health`` to answer 200, and tries another
    port when the server exits with 3 (it could not bind). ``kill()`` sends SIGKILL, ``stop()``
    SIGTERM and waits. The server's log goes to ``log_path`` (a temp file unless given).
    Subclasses set ``module`` and ``what`` (for messages) and pass ``args``."""

    module: str
    what = "server"

    def __init__(self, args: Sequence[str], extra_args: Sequence[str] = (), log_path: str | Path | None = None,
                 startup_timeout: float = 120.0, env: dict | None = None, port: int | None = None,
                 log_prefix: str = "server-"):
        import tempfile

        self.args, self.extra_args = list(args), list(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix=log_prefix, suffix=".log")[1])
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port = port or 0
        self._fixed_port = port is not None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True):
        """Start the server (and, with ``wait``, wait until it answers); returns ``self``."""
        for _attempt in range(3):  # a free port can be taken between the probe and the bind
            if not self._fixed_port:
                self.port = free_port()
            env = dict(os.environ if self.env is None else self.env)
            # the child imports this very package, even where another copy is installed
            root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cmd = [sys.executable, "-m", self.module, *self.args, "--host", "127.0.0.1", "--port", str(self.port),
                   *self.extra_args]
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            if not wait or self.wait_ready():
                return self
            if self.proc.returncode != 3 or self._fixed_port:  # 3: could not bind, try another port
                break
        raise RuntimeError(f"{self.what} exited with {self.proc.returncode}; log: {self.log_text()[-2000:]}")

    def wait_ready(self) -> bool:
        """True once /health answers; False if the process exited; TimeoutError after the timeout."""
        import urllib.request

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as r:
                    if r.status == 200:
                        return True
            except OSError:
                time.sleep(0.05)
        if self.proc.poll() is not None:
            return False
        self.kill()
        raise TimeoutError(f"{self.what} did not answer /health within {self.startup_timeout} s; log: {self.log_text()[-2000:]}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
