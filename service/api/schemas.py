"""Request and response bodies of the HTTP API (these are what /docs shows)."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.methods.exits import READ_AS_INF, threshold_problem, too_long_for_float

TextPair = tuple[str, str]

# The early-exit policies of `service.methods.exits.POLICIES`, spelled out so that this module
# (and every request validation) does not import torch; a test keeps the two lists equal.
ExitPolicyName = Literal["confidence", "entropy", "patience", "off"]
MAX_TIMEOUT_MS = 3_600_000  # one hour: the longest deadline a request may ask for


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="What went wrong, for a human.")
    error_type: str = Field(description="Stable machine-readable kind, e.g. `task_not_found`.")
    problems: list[str] | None = Field(default=None, description="Refused uploads: every problem found.")


class EarlyExit(BaseModel):
    """Per-request early exit, overriding the policy stored with the task (exit-head tasks only)."""

    model_config = ConfigDict(extra="forbid")

    policy: ExitPolicyName = Field(
        description="`confidence`: leave when the learned confidence >= threshold; `entropy`: when the "
        "exit's softmax entropy (nats) <= threshold; `patience`: when `threshold` consecutive exits agree "
        "(at most the task's number of exit layers: more is refused with 422, as it could never exit); "
        "`off`: run every layer."
    )
    # strict: a JSON number only (not true, not "0.5"), as the OpenAPI document says
    threshold: float | None = Field(
        default=None, allow_inf_nan=False, strict=True,
        description="Policy threshold; default: the task's calibrated one for this policy (`adaptserve train --early-exit` stores one per policy), else the policy's own (confidence 0.9, entropy 0.3, patience 2).",
    )

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_is_a_float(cls, value: Any, info: ValidationInfo) -> Any:
        # JSON numbers have no range: an integer of 400 digits fits no float (pydantic would call it
        # "not a valid number") and 1e400 reads as inf. Say that it is out of range, and the range.
        if _beyond_floats(value):
            raise ValueError(threshold_problem(info.data.get("policy", "off"), value))
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold_fits_policy(cls, value: float | None, info: ValidationInfo) -> float | None:
        # A field validator, not a model one: the error is reported at `early_exit.threshold`, where
        # a type error is. `policy` is declared first, so it is in info.data once it is valid (an
        # invalid policy is its own error, and no range applies).
        policy = info.data.get("policy")
        if value is None or policy in (None, "off"):
            return value
        problem = threshold_problem(policy, value)
        if problem:
            raise ValueError(problem)
        return value


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
        default=None, gt=0, le=MAX_TIMEOUT_MS, strict=True,  # `true` is not 1 ms, nor "100" 100 ms
        description="Deadline for this request; capped by the server's `request_timeout_s`.",
    )
    early_exit: EarlyExit | None = Field(
        default=None,
        description="Override the task's early-exit policy for every input of this request "
        "(tasks trained with exit classifiers only).",
    )

    @field_validator("timeout_ms", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        # 1e3 and 1000.0 are JSON's spellings of 1000 too (a client that computes the deadline
        # sends them); 1000.5 is still refused, as are `true` and "100".
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, float) and not math.isfinite(value):  # pydantic: "not a valid integer"
            raise ValueError(f"must be a whole number of milliseconds in [1, {MAX_TIMEOUT_MS}], got {value!r}"
                             + (f" ({READ_AS_INF})" if math.isinf(value) else ""))
        return value

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


def _beyond_floats(value: Any) -> bool:
    """A JSON number no float holds: an integer past ±1.8e308, or one that json read as inf or NaN."""
    return not math.isfinite(value) if isinstance(value, float) else too_long_for_float(value)


class PredictionOut(BaseModel):
    label: str = Field(description="The most probable label.")
    score: float = Field(description="Its probability.")
    scores: dict[str, float] = Field(description="Probability of every label.")
    version: str = Field(description="Version of the task that answered.")
    exit_layer: int | None = Field(
        default=None, description="1-based encoder layer that answered (the last layer unless the row exited early)."
    )


class ClassifyResponse(BaseModel):
    task: str
    version: str = Field(description="Active version of the task when the request was admitted.")
    predictions: list[PredictionOut] = Field(description="One per input, in order.")


Location = Literal["device", "host", "store"]
LOCATION_DOC = ("`device`: loaded on the engine's device; `host`: evicted from the device but kept as CPU "
                "tensors (promoted back without reading the store); `store`: only in the task store.")


PROBLEM_DOC = ("Why this version cannot serve, as far as this replica knows without reading its files: a file "
               "missing from the store, files whose size is not the uploaded one, or its last load here failing "
               "(e.g. files that no longer hash to the version id). null: no problem known.")


NO_ACTIVE_DOC = "Why the task has no active version"


class TaskSummary(BaseModel):
    name: str
    version: str | None = Field(description="Active version, or null when the store cannot tell (see `error`).")
    location: Location = Field(description=LOCATION_DOC)
    error: str | None = Field(default=None, description=NO_ACTIVE_DOC + " (`version` is null).")
    problem: str | None = Field(default=None, description=(
        "Why the active version cannot serve, as far as this replica knows without any read: its last load here "
        "failed. (`GET /v1/tasks/{task}/versions` also checks each version's files.) null: no problem known."))


class TaskList(BaseModel):
    tasks: list[TaskSummary]


class TaskInfo(BaseModel):
    """A task's own description (`Task.info()`: method, trainable parameters, labels, ...) plus
    where it is."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    location: Location = Field(description=LOCATION_DOC)


class UploadResponse(BaseModel):
    task: str
    version: str = Field(description="The new version's id: the content hash of its two files.")
    active: bool = Field(description="Whether this version now serves the task.")
    created: bool = Field(description="False when identical content was already stored (same id).")
    source: str = Field(description="`files`, `zip` or `tar.gz`.")
    kind: str = Field(description="`native` (adaptserve bundle) or `peft` (Hugging Face PEFT adapter).")
    warnings: list[str] = Field(
        default_factory=list,
        description="What was stored but is probably not what was meant, one sentence each, e.g. a PEFT adapter "
        "whose `base_model_name_or_path` names another model than this server's backbone (it may answer wrong "
        "scores). Empty when nothing is amiss.",
    )


class VersionInfo(BaseModel):
    version: str
    active: bool
    location: Location = Field(description=LOCATION_DOC)
    uploaded_at: float | None = Field(default=None, description="Unix time of the upload (null if not uploaded through the API).")
    bytes: int | None = Field(default=None, description="Size of its two files when uploaded (null if not uploaded through the API).")
    source: str | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="The upload's `warnings`, kept with the version (e.g. a PEFT adapter for another base model). "
        "Empty when there were none, or when it was not uploaded through the API.",
    )
    problem: str | None = Field(default=None, description=PROBLEM_DOC)


class TaskState(BaseModel):
    """A task's registry state after an admin change, or with its versions."""

    task: str
    active: str | None = Field(description="The version that serves now.")
    rollback_to: str | None = Field(description="The version a rollback would activate.")
    history: list[dict[str, Any]] = Field(description="Activation history, oldest first.")


class TaskVersions(TaskState):
    error: str | None = Field(default=None, description=NO_ACTIVE_DOC + " (`active` is null), as `GET /v1/tasks` gives it.")
    versions: list[VersionInfo]


class Deleted(BaseModel):
    task: str
    version: str | None = None
    deleted: bool = True


class TokenScope(BaseModel):
    """`GET /v1/token`: what the presented token may do. With auth off every caller may do all."""

    scope: Literal["admin", "inference"]
    auth_enabled: bool


class Health(BaseModel):
    status: Literal["ok", "failed"]
    error: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "starting", "stopping", "failed"]
    error: str | None = None
    backbone: dict[str, Any] | None = Field(default=None, description="Name, fingerprint, parameters, device, dtype.")
    registry: dict[str, Any] | None = Field(
        default=None, description="Registry backend and whether it is reachable (serving goes on while it is not)."
    )
