"""Which version of each task is active, its history, and the change feed (see `base`)."""
from __future__ import annotations

from typing import Mapping

from service.registry.base import ChangeListener, Registry, TaskRecord
from service.registry.local import LocalRegistry
from service.store import BundleStore


def open_registry(settings, store: BundleStore,  # settings: service.settings.Settings
                  flags: Mapping[str, str] | None = None) -> Registry:
    """`RedisRegistry` when `ADAPTSERVE_REDIS_URL` is set, else the store's own files. `flags`: the
    settings a command line set (field -> flag), which its messages name by their flag."""
    if settings.redis_url:
        from service.registry.redis_registry import RedisRegistry  # imports redis only when used
        from service.settings import setting_name  # pydantic: not for what only writes bundles

        return RedisRegistry(
            settings.redis_url,
            store,
            prefix=settings.redis_prefix,
            timeout_s=settings.redis_timeout_s,
            reconnect_min_s=settings.redis_reconnect_min_s,
            reconnect_max_s=settings.redis_reconnect_max_s,
            resync_s=settings.registry_resync_s,
            history_max=settings.registry_history_max,
            stream_maxlen=settings.registry_stream_maxlen,
            url_setting=setting_name("redis_url", flags),
        )
    return LocalRegistry(store, history_max=settings.registry_history_max, pointer_ttl_s=settings.store_pointer_ttl_s,
                         resync_s=settings.registry_resync_s)


__all__ = ["ChangeListener", "LocalRegistry", "Registry", "TaskRecord", "open_registry"]
