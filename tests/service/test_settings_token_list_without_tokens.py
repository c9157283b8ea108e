"""A token variable that is set but names no token (`ADAPTSERVE_ADMIN_TOKENS=,`, what `${A},${B}`
becomes with both unset) is refused like an empty token file, instead of starting a server with
auth off. A blank variable still means unset."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings, describe_validation_error


@pytest.mark.parametrize("name", ["ADMIN_TOKENS", "INFERENCE_TOKENS"])
@pytest.mark.parametrize("value", [",", " , ", ",,\n,"])
def test_a_token_variable_of_only_commas_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(f"ADAPTSERVE_{name}", value)
    with pytest.raises(ValidationError) as error:
        Settings()
    message = describe_validation_error(error.value)
    assert message.startswith(f"ADAPTSERVE_{name}: holds no tokens"), message


def test_a_blank_token_variable_still_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTSERVE_ADMIN_TOKENS", "  ")
    assert Settings().admin_tokens == []
    monkeypatch.setenv("ADAPTSERVE_ADMIN_TOKENS", "tok-1, ,tok-2,")
    assert len(Settings().admin_tokens) == 2
