"""Request and response bodies of the HTTP API (these are what /docs shows)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TextPair = tuple[str, str]


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="What went wrong, for a human.")
    error_type: str = Field(description="Stable machine-readable kind, e.g. `task_not_found`.")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": ["great movie", "dull plot"]}]},
    )

    inputs: list[str | TextPair] = Field(
        min_length=1,
        description="Texts to classify: strings for single-text tasks, `[text, text_pair]` for "
        "pair tasks. At most `max_inputs_per_request` items of `max_chars_per_input` characters.",
    )
    timeout_ms: int | None = Field(
        default=None, gt=0, le=3_600_000,
        description="Deadline for this request; capped by the server's `request_timeout_s`.",
    )

    @field_validator("inputs")
    @classmethod
    def _valid_unicode(cls, inputs: list[str | TextPair]) -> list[str | TextPair]:
        # JSON can carry lone surrogates (`"\ud800"`); no tokenizer can, so refuse them here.
        for index, item in enumerate(inputs):
            for text in item if isinstance(item, tuple) else (item,):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"inputs[{index}] is not valid Unicode (it holds a lone surrogate)") from None
        return inputs


class PredictionOut(BaseModel):
    label: str = Field(description="The most probable label.")
    score: float = Field(description="Its probability.")
    scores: dict[str, float] = Field(description="Probability of every label.")
    version: str = Field(description="Version of the task that answered.")
    exit_layer: int | None = Field(default=None, description="Encoder layer the row exited at (early-exit tasks only).")


class ClassifyResponse(BaseModel):
    task: str
    version: str = Field(description="Active version of the task when the request was admitted.")
    predictions: list[PredictionOut] = Field(description="One per input, in order.")


Location = Literal["device", "store"]


class TaskSummary(BaseModel):
    name: str
    version: str | None = Field(description="Active version, or null when the store cannot tell (see `error`).")
    location: Location = Field(description="`device` when loaded and resident in the task cache, else `store`.")
    error: str | None = None


class TaskList(BaseModel):
    tasks: list[TaskSummary]


class TaskInfo(BaseModel):
    """A task's own description (`Task.info()`: method, trainable parameters, labels, ...) plus
    where it is."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    location: Location


class Health(BaseModel):
    status: Literal["ok", "failed"]
    error: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "starting", "stopping", "failed"]
    error: str | None = None
    backbone: dict[str, Any] | None = Field(default=None, description="Name, fingerprint, parameters, device, dtype.")
