from __future__ import annotations

from pathlib import Path

import pytest

from service.engine.types import TaskKey
from service.errors import ConfigurationError, InvalidTaskName, TaskNotFound, TaskUnavailable
from service.store import LocalStore, TaskListing, validate_task_name
from tests.fakes import write_task


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    write_task(tmp_path, "single", "v1")
    write_task(tmp_path, "chosen", "v1")
    write_task(tmp_path, "chosen", "v2", active=True)
    write_task(tmp_path, "ambiguous", "v1")
    write_task(tmp_path, "ambiguous", "v2")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "ACTIVE").write_text("v9")
    (tmp_path / "escape").mkdir()
    (tmp_path / "escape" / "ACTIVE").write_text("../single/v1")
    (tmp_path / "notes.txt").write_text("a file, not a task")
    (tmp_path / "Not_A_Task").mkdir()
    return LocalStore(tmp_path)


@pytest.mark.parametrize(
    "name",
    ["", "A", "Upper", "../etc", "a/b", ".hidden", "-dash", "_under", "a b", "é", "x" * 65, "a\x00b", "a\\b"],
)
def test_unsafe_task_names_are_refused(store: LocalStore, name: str) -> None:
    with pytest.raises(InvalidTaskName):
        validate_task_name(name)
    with pytest.raises(InvalidTaskName):
        store.resolve(name)


@pytest.mark.parametrize("name", ["a", "0", "sst2", "mnli-m", "task_1.v2", "x" * 64])
def test_safe_task_names_pass(name: str) -> None:
    assert validate_task_name(name) == name


@pytest.mark.parametrize(
    "task, expected",
    [
        ("single", TaskKey("single", "v1")),  # the only version, no ACTIVE
        ("chosen", TaskKey("chosen", "v2")),  # ACTIVE wins over the other version
    ],
)
def test_resolve_active_version(store: LocalStore, task: str, expected: TaskKey) -> None:
    assert store.resolve(task) == expected
    assert store.bundle_dir(expected) == store.root / task / expected.version


@pytest.mark.parametrize(
    "task, error, message",
    [
        ("missing", TaskNotFound, "not found"),
        ("ambiguous", TaskUnavailable, "2 versions (v1, v2) and no ACTIVE"),
        ("empty", TaskNotFound, "no version in the store yet"),  # a first upload still writing, or a stopped one
        ("dangling", TaskUnavailable, "'v9', which is not in the store"),
        ("escape", TaskUnavailable, "invalid version id"),
    ],
)
def test_resolve_errors(store: LocalStore, task: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        store.resolve(task)


def test_bundle_dir_refuses_unsafe_or_missing_versions(store: LocalStore) -> None:
    with pytest.raises(TaskUnavailable):
        store.bundle_dir(TaskKey("single", "../chosen"))
    with pytest.raises(TaskUnavailable):
        store.bundle_dir(TaskKey("single", "v7"))
    with pytest.raises(InvalidTaskName):
        store.bundle_dir(TaskKey("../single", "v1"))


def test_list_tasks_reports_broken_tasks_without_failing(store: LocalStore) -> None:
    listings = {listing.name: listing for listing in store.list_tasks()}
    assert sorted(listings) == ["ambiguous", "chosen", "dangling", "escape", "single"]  # "empty" is no task yet
    assert listings["chosen"] == TaskListing("chosen", "v2")
    assert listings["single"] == TaskListing("single", "v1")
    assert listings["ambiguous"].version is None and "ACTIVE" in (listings["ambiguous"].error or "")


def test_writing_active_switches_version_without_restart(store: LocalStore) -> None:
    (store.root / "ambiguous" / "ACTIVE").write_text("v1")
    assert store.resolve("ambiguous") == TaskKey("ambiguous", "v1")
    (store.root / "ambiguous" / "ACTIVE").write_text("v2")
    assert store.resolve("ambiguous") == TaskKey("ambiguous", "v2")


def test_has_task(store: LocalStore) -> None:
    assert store.has_task("single")
    assert not store.has_task("missing")
    assert not store.has_task("../single")
    assert not store.has_task("notes.txt")  # a valid name, but a file


def test_store_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a directory"):
        LocalStore(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigurationError):
        LocalStore(tmp_path / "file")


def test_a_failed_bundle_write_names_its_path_and_leaves_no_empty_task_directory(tmp_path, monkeypatch):
    """A full disk: the error names the bundle being written, and a task directory the write made
    for it is removed again; a task directory that was there already (with its versions) stays."""
    import errno
    import os as os_

    import service.engine.bundle as bundle

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle.os, "fsync", full)
    with pytest.raises(OSError, match=r"cannot write the bundle .*new-task/v1: No space left on device") as err:
        bundle.write_bundle_files(tmp_path / "new-task" / "v1", b"{}", b"x")
    assert err.value.errno == errno.ENOSPC
    assert not (tmp_path / "new-task").exists()
    (tmp_path / "old-task" / "v0").mkdir(parents=True)
    with pytest.raises(OSError, match="No space left"):
        bundle.write_bundle_files(tmp_path / "old-task" / "v1", b"{}", b"x")
    assert os_.listdir(tmp_path / "old-task") == ["v0"]  # no temp directory left either


def test_leftovers_of_interrupted_writes_are_swept_when_old(tmp_path):
    """A crash mid-write leaves a temporary directory or a renamed-aside copy; the server removes
    those an hour old when it starts, never a fresh one (another replica may be writing it) and
    never a task, a version or a pointer."""
    import os
    import time

    from tests.fakes import write_task

    write_task(tmp_path, "t", "v1", active=True)
    old = time.time() - 2 * 3600
    leftovers = [tmp_path / "t" / ".tmp-abc123", tmp_path / "t" / ".replaced-v1-1234abcd", tmp_path / ".deleted-gone-5678abcd"]
    for d in leftovers:
        (d / "inner").mkdir(parents=True)
        os.utime(d, (old, old))
    (tmp_path / "t" / ".ACTIVE.deadbeef.tmp").write_text("v9")
    os.utime(tmp_path / "t" / ".ACTIVE.deadbeef.tmp", (old, old))
    fresh = tmp_path / "t" / ".tmp-writing-now"
    fresh.mkdir()
    store = LocalStore(tmp_path)
    assert store.sweep_leftovers() == 4
    assert not any(d.exists() for d in leftovers) and not (tmp_path / "t" / ".ACTIVE.deadbeef.tmp").exists()
    assert fresh.is_dir() and store.versions("t") == ["v1"] and store.active_version("t") == "v1"
