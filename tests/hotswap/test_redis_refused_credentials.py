"""A Redis that refuses the replica's password is a configuration to fix, not an outage to wait
out: the replica keeps serving what it knows (as in an outage), but the log, /readyz's registry
status and the admin 503 say that the credentials were refused and which setting holds them.
Before, all three said only "Redis unreachable (AuthenticationError)" / "unreachable", as for a
network outage, while the replica served stale versions for good. The password is never shown."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.errors import RegistryUnavailable
from service.store import LocalStore
from tests.aio import async_test, wait_until
from tests.fakes import write_task
from tests.hotswap.servers import RedisServer


@async_test
async def test_a_refused_password_is_named_as_such(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from service.registry.redis_registry import RedisRegistry

    write_task(tmp_path / "store", "t", "v1", active=True)
    server = RedisServer(tmp_path / "redis").start(password="right-pass-123")
    url = f"redis://:wrong-pass-456@127.0.0.1:{server.port}/0"
    registry = RedisRegistry(url, LocalStore(tmp_path / "store"), timeout_s=0.5, reconnect_min_s=0.05, reconnect_max_s=0.2)
    caplog.set_level(logging.WARNING, logger="service.registry.redis_registry")
    await registry.start()
    try:
        await wait_until(lambda: "error" in registry.status())
        status = registry.status()
        assert status["connected"] is False
        assert "refused this replica's credentials" in status["error"] and "ADAPTSERVE_REDIS_URL" in status["error"]
        with pytest.raises(RegistryUnavailable) as refused:
            registry.require_writable()
        assert "credentials" in str(refused.value)
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "refused this replica's credentials" in logged
        for text in (str(status), str(refused.value), logged):
            assert "wrong-pass-456" not in text and "right-pass-123" not in text
    finally:
        await registry.stop()
        server.kill()
