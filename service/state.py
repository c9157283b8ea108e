"""What the HTTP layer shares: settings, store, metrics, and the runtime that exists once the
engine is up. Kept apart from the app factory so routes can import it without a cycle."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from service.auth import Tokens
from service.cache import TaskCache
from service.engine.types import ClassifyItem, Prediction, TaskKey
from service.errors import NotReady, ShuttingDown
from service.metrics import Metrics
from service.scheduler import Scheduler
from service.registry import Registry
from service.settings import Settings
from service.store import BundleStore

if TYPE_CHECKING:
    from service.hotswap import TaskAdmin
    from service.memory import FullCollections


class TaskLike(Protocol):
    """What the service needs of a loaded task (`service.engine.task.Task`)."""

    key: TaskKey
    nbytes: int
    labels: list[str]
    input_kind: str  # "single" | "pair"
    has_exits: bool  # early-exit classifiers: a per-request exit policy applies
    exit_count: int  # layers with an exit classifier: the most a patience can be
    max_length: int  # tokens per input the task reads
    overflow: str  # "truncate" | "refuse": what an input over max_length tokens gets
    prompt_tokens: int  # a prompt task's template and special tokens, counted with each input (0: no template)

    def info(self) -> dict[str, Any]: ...

    def exit_problems(self) -> list[str]:
        """What the stored early-exit policy asks that the task's exits cannot do (refused at upload)."""
        ...

    def exit_threshold(self, policy: str) -> float | None:
        """The threshold a request naming only `policy` gets: the task's calibrated one, or None
        (the engine's default for that policy)."""
        ...


class EngineLike(Protocol):
    """What the service needs of the engine (`service.engine.engine.Engine`); the seam tests fake."""

    backbone: Any  # .name, .fingerprint, .num_params, .device, .dtype; optional .model_id

    def load_task(self, bundle_dir: Path, key: TaskKey) -> TaskLike: ...
    def classify(self, items: Sequence[ClassifyItem]) -> list[Prediction]: ...
    def token_counts(self, items: Sequence[ClassifyItem]) -> list[int]: ...
    def pretokenize(self, items: Sequence[ClassifyItem]) -> list[ClassifyItem]: ...
    def pretokenize_inline(self, items: Sequence[ClassifyItem]) -> list[ClassifyItem] | None: ...
    def warmup(self) -> None: ...


@dataclass
class Runtime:
    """The parts that exist only once the backbone is loaded and warmed up."""

    engine: EngineLike
    cache: TaskCache[TaskLike]
    scheduler: Scheduler


@dataclass
class ServiceState:
    settings: Settings
    store: BundleStore
    registry: Registry
    metrics: Metrics
    tokens: Tokens = field(default_factory=Tokens)
    admin: "TaskAdmin | None" = None
    runtime: Runtime | None = None
    startup_error: str | None = None  # why the backbone or warmup failed; the server never gets ready
    # Called once startup has failed: `adaptserve serve` stops the server there (exit 1), so an
    # orchestrator restarts it at once. Without it (an app built in a test), the server stays up
    # with /healthz and /readyz saying why.
    on_startup_failure: Callable[[], None] | None = None
    # Set by `adaptserve serve` (process-wide garbage-collector settings, which a test's app must
    # not take): called once the server is ready, and the forward thread's full-collection pacer.
    on_ready: Callable[[], object] | None = None
    full_collections: FullCollections | None = None
    stopping: bool = False
    # The settings the command line set, field -> flag (`adaptserve serve`): messages name those by
    # their flag, the others by their variable (service.settings.setting_name).
    flags: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.runtime is not None and not self.stopping

    def require_runtime(self) -> Runtime:
        """The runtime, or the 503 that explains why there is none yet."""
        if self.stopping:
            raise ShuttingDown("server is shutting down")
        if self.runtime is None:
            if self.startup_error is not None:
                raise NotReady(f"server failed to start: {self.startup_error}")
            # Loading takes seconds to a minute; a refused request costs nothing, so a client polls
            # once a second. A failed start gets no Retry-After: no retry helps until a restart.
            raise NotReady("server is starting: the backbone is loading", headers={"Retry-After": "1"})
        return self.runtime
