"""ADAPTSERVE_REDIS_URL's query options are checked at start-up as the registry's client will read
them. Before, `unix:///tmp/redis.sock?db=q` or `redis://redis:6379/0?socket_timeout=abc` passed the
settings check and then stopped start-up with a redis-py traceback (exit 3, no setting named), and
an option no connection takes (`?foo=bar`, `?ssl_cert_reqs=` over plain redis://) made the
registry's feed fail with a logged traceback on every reconnect, forever."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings, describe_validation_error


@pytest.mark.parametrize(("url", "says"), [
    ("unix://:pw-SECRET@/tmp/redis.sock?db=q", "Invalid value for 'db'"),
    ("redis://:pw-SECRET@redis:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
    ("redis://:pw-SECRET@redis:6379/0?health_check_interval=x", "Invalid value for 'health_check_interval'"),
    ("redis://:pw-SECRET@redis:6379/0?foo=bar", "option(s) foo"),
    ("redis://:pw-SECRET@redis:6379/0?ssl_cert_reqs=none", "option(s) ssl_cert_reqs"),
    ("unix://", "names no socket path"),
])
def test_a_redis_url_the_client_cannot_use_is_refused_by_name(url: str, says: str) -> None:
    with pytest.raises(ValidationError) as error:
        Settings(redis_url=url)
    message = describe_validation_error(error.value, {"redis_url": "--redis-url"})
    assert message.startswith("--redis-url: ") and says in message, message
    assert "SECRET" not in message


@pytest.mark.parametrize("url", [
    "redis://redis:6379/0?socket_timeout=2&health_check_interval=10",
    "rediss://user:pw@cache.example.com:6380/0?ssl_cert_reqs=none",
    "unix:///run/redis.sock?db=1",
    "redis://redis:6379/0?max_connections=20&client_name=adaptserve",
])
def test_redis_urls_with_options_redis_py_takes_are_accepted(url: str) -> None:
    assert Settings(redis_url=url).redis_url == url
