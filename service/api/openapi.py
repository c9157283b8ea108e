"""The OpenAPI document, completed with what the routes check by hand.

Task names and version ids are checked by `service.store` (so that a bad one is a 422
`invalid_task_name`, or a 404 for a version that cannot exist, with our own message) rather than
by FastAPI, which therefore cannot see their patterns; they are added to the document here, so a
client or a fuzzer knows which names the server accepts. The same goes for the request limits,
which are settings."""
from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI

from service.settings import Settings
from service.store import TASK_NAME_RE, VERSION_RE

PATH_PATTERNS = {"task": TASK_NAME_RE.pattern, "version": VERSION_RE.pattern}


def complete(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                pattern = PATH_PATTERNS.get(parameter.get("name")) if parameter.get("in") == "path" else None
                if pattern is not None:
                    parameter.setdefault("schema", {})["pattern"] = pattern
    # The request limits are settings, so they are this server's, not the model's: declared here.
    inputs = schema.get("components", {}).get("schemas", {}).get("ClassifyRequest", {}).get("properties", {}).get("inputs")
    if inputs is not None:
        inputs["maxItems"] = settings.max_inputs_per_request
        _cap_strings(inputs.get("items", {}), settings.max_chars_per_input)
    return schema


def _cap_strings(node: Any, max_chars: int) -> None:
    """`maxLength` on every string schema under `node` (a text, or either text of a pair)."""
    if isinstance(node, dict):
        if node.get("type") == "string":
            node["maxLength"] = max_chars
        for value in node.values():
            _cap_strings(value, max_chars)
    elif isinstance(node, list):
        for value in node:
            _cap_strings(value, max_chars)


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(build(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
