"""k8s/base/secret.yaml ships `CHANGE-ME-...` tokens: a server started with them has auth on but
with tokens anyone who read this repository knows, and used to say only "auth enabled". It now
warns, loudly (even at --log-level error, as for auth off), naming the tokens by position only."""
from __future__ import annotations

import logging

import pytest

from service.auth import Tokens, warn_if_disabled


def test_placeholder_tokens_are_warned_about_by_position(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.auth")
    warn_if_disabled(Tokens(admin=(b"real-admin-0123456789", b"CHANGE-ME-admin-token"),
                            inference=(b"change-me-inference-token",)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PLACEHOLDER TOKENS" in warnings[0]
    assert "admin token 2" in warnings[0] and "inference token 1" in warnings[0] and "admin token 1" not in warnings[0]
    assert "admin-token" not in warnings[0] and "real-admin" not in warnings[0]


def test_real_tokens_get_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.auth")
    warn_if_disabled(Tokens(admin=(b"real-admin-0123456789",), inference=(b"real-inference-0123456789",)))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_placeholder_warning_survives_a_quiet_log_level(capsys: pytest.CaptureFixture) -> None:
    logger = logging.getLogger("service.auth")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        warn_if_disabled(Tokens(admin=(b"CHANGE-ME-admin-token",)))
    finally:
        logger.setLevel(level)
    assert "PLACEHOLDER TOKENS" in capsys.readouterr().err
