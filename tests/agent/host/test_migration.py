"""A migration's figures from libvirt's job stats, the decisions taken while it runs, and its
supervision against a fake job (real migrations between two hosts: test_live_migration.py)."""

from __future__ import annotations

import asyncio
import dataclasses

import libvirt
import pytest

from agent.host.errors import HypervisorError, MigrationTimeoutError
from agent.host.migration import (
    JOB_NONE,
    MIGRATION_POLL_S,
    MigrationProgress,
    Watched,
    migration_progress,
    migration_result,
    past_timeout,
    ready_for_postcopy,
    watch,
)

# jobStats() of a live migration with a disk, from QEMU 7.2 under libvirt 9.0 (trimmed).
RUNNING = {
    "type": 2, "operation": 8, "time_elapsed": 1520, "data_total": 1_300_000_000,
    "data_processed": 420_000_000, "data_remaining": 880_000_000,
    "memory_total": 268_435_456, "memory_processed": 150_000_000,
    "memory_remaining": 118_435_456, "memory_iteration": 1, "memory_dirty_rate": 310,
    "disk_total": 1_073_741_824, "disk_processed": 270_000_000,
    "disk_remaining": 803_741_824, "downtime": 41,
}
# jobStats(VIR_DOMAIN_JOB_STATS_COMPLETED) of the same migration: no disk figures.
COMPLETED = {
    "type": 3, "operation": 8, "time_elapsed": 6010, "downtime": 37,
    "data_processed": 281_000_000, "memory_processed": 279_000_000, "memory_iteration": 3,
}
ABORTED = libvirt.VIR_ERR_OPERATION_ABORTED


def figures(iteration: int | None) -> MigrationProgress:
    running = migration_progress(RUNNING)
    assert running is not None
    return dataclasses.replace(running, memory_iteration=iteration)


def test_running_job_stats_become_progress_figures() -> None:
    progress = migration_progress(RUNNING)
    assert progress is not None
    assert (progress.elapsed_ms, progress.data_remaining_bytes) == (1520, 880_000_000)
    assert (progress.memory_iteration, progress.memory_dirty_rate_pages_s) == (1, 310)
    assert (progress.disk_total_bytes, progress.expected_downtime_ms) == (1_073_741_824, 41)
    assert migration_progress({"type": JOB_NONE}) is None  # no job runs
    assert migration_progress({}) is None
    early = migration_progress({"type": 2})
    assert early is not None
    assert early.memory_total_bytes is None  # absent, not invented
    assert libvirt.VIR_DOMAIN_JOB_NONE == JOB_NONE


def test_the_result_counts_the_disk_from_the_last_figures() -> None:
    result = migration_result(6200, COMPLETED, migration_progress(RUNNING))
    assert (result.duration_ms, result.downtime_ms, result.job_elapsed_ms) == (6200, 37, 6010)
    assert (result.memory_bytes, result.memory_iterations) == (279_000_000, 3)
    assert result.disk_bytes == 1_073_741_824  # it succeeded: the whole disk went
    assert result.transferred_bytes == 281_000_000 + 1_073_741_824
    # A completed job that counts its disk is taken as it is.
    counted = migration_result(1, {**COMPLETED, "disk_processed": 5}, migration_progress(RUNNING))
    assert (counted.disk_bytes, counted.transferred_bytes) == (5, 281_000_000)
    # No disk copied; the destination's figures unreadable.
    memory_only = migration_result(10, COMPLETED,
                                   dataclasses.replace(figures(2), disk_total_bytes=0))
    assert (memory_only.disk_bytes, memory_only.transferred_bytes) == (None, 281_000_000)
    unread = migration_result(10, {})
    assert unread == dataclasses.replace(unread, downtime_ms=None, transferred_bytes=None,
                                         memory_bytes=None, disk_bytes=None,
                                         memory_iterations=None, job_elapsed_ms=None)


def test_timeout_and_postcopy_decisions() -> None:
    assert past_timeout(30.1, 30.0)
    assert not past_timeout(30.0, 30.0)
    assert not past_timeout(1e9, None)
    assert not ready_for_postcopy(figures(None))
    assert not ready_for_postcopy(figures(1))
    assert ready_for_postcopy(figures(2))
    assert ready_for_postcopy(figures(5))


class FakeMigration:
    """The migration call and its job. The call returns after ``runs_s``, or fails as
    libvirt's does once aborted (unless ``finishing``: then it completes all the same). Each
    read of the figures is one more pass over memory; ``stats`` may script the reads."""

    def __init__(self, runs_s: float, *, finishing: bool = False,
                 stats: list[MigrationProgress | HypervisorError | None] | None = None) -> None:
        self.runs_s = runs_s
        self.finishing = finishing
        self.script = stats
        self.calls: list[str] = []
        self.aborted = asyncio.Event()
        self.ended = False

    async def call(self) -> None:
        try:
            async with asyncio.timeout(self.runs_s):
                await self.aborted.wait()
        except TimeoutError:
            return
        finally:
            self.ended = True
        if not self.finishing:
            raise HypervisorError("operation aborted: migration out job: canceled by client",
                                  ABORTED)

    async def stats(self) -> MigrationProgress | None:
        self.calls.append("stats")
        if self.script is None:
            return figures(self.calls.count("stats"))
        step = self.script.pop(0) if self.script else None
        if isinstance(step, HypervisorError):
            raise step
        return step

    async def abort(self) -> None:
        self.calls.append("abort")
        self.aborted.set()

    async def start_postcopy(self) -> None:
        self.calls.append("start_postcopy")


async def test_a_migration_reports_each_new_figure_and_returns_the_last() -> None:
    fake = FakeMigration(4.5 * MIGRATION_POLL_S)
    seen: list[MigrationProgress] = []
    watched = await watch(fake.call(), fake, timeout_s=None, postcopy=False,
                          progress=seen.append)
    assert len(seen) >= 3  # a read every MIGRATION_POLL_S (4 on an idle machine)
    assert [f.memory_iteration for f in seen] == list(range(1, len(seen) + 1))
    assert watched == Watched(watched.duration_ms, seen[-1])
    runs_ms = 4.5 * MIGRATION_POLL_S * 1000
    assert runs_ms <= watched.duration_ms < runs_ms + 1000
    assert "abort" not in fake.calls
    assert "start_postcopy" not in fake.calls  # never without postcopy


async def test_figures_that_cannot_be_read_are_skipped() -> None:
    first, second = figures(1), figures(1)
    fake = FakeMigration(7.5 * MIGRATION_POLL_S, stats=[
        first, None, HypervisorError("domain is not running", 55), second])
    seen: list[MigrationProgress] = []
    watched = await watch(fake.call(), fake, timeout_s=None, postcopy=False,
                          progress=seen.append)
    assert seen == [first, second]
    assert seen[1] is second  # equal figures read again are reported again
    assert watched.last is second
    assert len(fake.calls) >= 5
    assert set(fake.calls) == {"stats"}


async def test_postcopy_starts_once_after_the_first_pass_over_memory() -> None:
    fake = FakeMigration(5.5 * MIGRATION_POLL_S)
    await watch(fake.call(), fake, timeout_s=None, postcopy=True, progress=None)
    assert fake.calls[:3] == ["stats", "stats", "start_postcopy"]
    assert fake.calls.count("stats") >= 3
    assert fake.calls.count("start_postcopy") == 1


async def test_past_its_timeout_the_job_is_aborted() -> None:
    fake = FakeMigration(60)
    with pytest.raises(MigrationTimeoutError) as info:
        await watch(fake.call(), fake, timeout_s=1.5 * MIGRATION_POLL_S, postcopy=True,
                    progress=None)
    assert fake.calls.count("abort") == 1
    assert fake.calls[-1] == "abort"  # no figures read (nor post-copy) after the abort
    assert info.value.code == ABORTED
    assert info.value.timeout_s == 1.5 * MIGRATION_POLL_S
    assert str(info.value) == ("migration aborted after 0.375 s: operation aborted: "
                               "migration out job: canceled by client")


async def test_a_job_already_finishing_when_aborted_completes() -> None:
    fake = FakeMigration(60, finishing=True)
    watched = await watch(fake.call(), fake, timeout_s=2.5 * MIGRATION_POLL_S,
                          postcopy=False, progress=None)
    reads = len(fake.calls) - 1
    assert reads >= 1
    assert fake.calls == ["stats"] * reads + ["abort"]
    assert watched.last == figures(reads)


async def test_a_failed_migration_raises_libvirts_error() -> None:
    refused = HypervisorError("unable to connect to server", 38)

    async def call() -> None:
        await asyncio.sleep(1.5 * MIGRATION_POLL_S)
        raise refused

    fake = FakeMigration(0)
    with pytest.raises(HypervisorError) as info:
        await watch(call(), fake, timeout_s=60, postcopy=False, progress=None)
    assert info.value is refused
    assert "abort" not in fake.calls


async def test_cancelling_aborts_the_job_and_lets_it_wind_down() -> None:
    fake = FakeMigration(60)
    task = asyncio.ensure_future(watch(fake.call(), fake, timeout_s=None, postcopy=False,
                                       progress=None))
    await asyncio.sleep(1.5 * MIGRATION_POLL_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.calls[-1] == "abort"
    assert fake.calls.count("abort") == 1
    assert fake.ended  # the call was waited for


async def test_a_progress_callback_that_raises_aborts_the_job() -> None:
    fake = FakeMigration(60)

    def progress(_: MigrationProgress) -> None:
        raise RuntimeError("a bug in the caller")

    with pytest.raises(RuntimeError, match="a bug in the caller"):
        await watch(fake.call(), fake, timeout_s=None, postcopy=False, progress=progress)
    assert fake.calls == ["stats", "abort"]
    assert fake.ended
