"""A live migration's figures and its supervision, without libvirt.

``hypervisor.py`` starts the migration call (peer to peer, on a connection of its own) and
hands it to :func:`watch` with the guest's :class:`MigrationJob`; :func:`watch` reads the
job's figures while it runs, reports them, switches to post-copy when asked, and aborts past
the timeout or when cancelled. The figures are libvirt's ``jobStats`` records (typed
parameters, a dict) copied field by field: :func:`migration_progress` while the job runs,
:func:`migration_result` once it completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from agent.host.errors import HypervisorError, MigrationTimeoutError

MIGRATION_POLL_S: Final = 0.25  # how often migrate() reads the job's progress and the clock
MIGRATION_ABORT_WAIT_S: Final = 30.0  # how long an aborted migration may take to wind down
POSTCOPY_AFTER_ITERATION: Final = 2  # post-copy once the first pass over memory is done
JOB_NONE: Final = 0  # libvirt's VIR_DOMAIN_JOB_NONE: the guest runs no job


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """A running migration's figures, copied from libvirt's job stats; None where libvirt
    gave none (early in the job, or a figure that does not apply)."""

    elapsed_ms: int | None
    data_total_bytes: int | None
    data_processed_bytes: int | None
    data_remaining_bytes: int | None
    memory_total_bytes: int | None
    memory_processed_bytes: int | None
    memory_remaining_bytes: int | None
    memory_iteration: int | None  # passes over the guest's memory so far
    memory_dirty_rate_pages_s: int | None
    disk_total_bytes: int | None
    disk_processed_bytes: int | None
    disk_remaining_bytes: int | None
    expected_downtime_ms: int | None


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """A finished migration. ``duration_ms`` is the wall time of the migration call here;
    the rest comes from the completed job's stats on the destination (None when they could
    not be read there)."""

    duration_ms: int
    downtime_ms: int | None  # guest paused at the source until it resumed at the destination
    transferred_bytes: int | None  # memory, disks and device state
    memory_bytes: int | None
    disk_bytes: int | None  # None: no disk was copied
    memory_iterations: int | None
    job_elapsed_ms: int | None  # libvirt's own duration of the job


@dataclass(frozen=True, slots=True)
class Watched:
    """A migration call that returned: its wall time, and its last figures while it ran."""

    duration_ms: int
    last: MigrationProgress | None


class MigrationJob(Protocol):
    """The migrating guest's job, as :func:`watch` drives it. Each call may raise
    :class:`HypervisorError` (the job may just have ended); :func:`watch` lets it pass."""

    async def stats(self) -> MigrationProgress | None:
        """The running job's figures; None when no job runs (or the driver runs none)."""

    async def abort(self) -> None:
        """Abort the running job."""

    async def start_postcopy(self) -> None:
        """Switch the running migration to post-copy."""


def _int(stats: dict[str, Any], key: str) -> int | None:
    value = stats.get(key)
    return int(value) if isinstance(value, int) else None


def migration_progress(stats: dict[str, Any]) -> MigrationProgress | None:
    """A running job's ``jobStats`` as figures; None when no job runs."""
    if _int(stats, "type") in (None, JOB_NONE):
        return None
    return MigrationProgress(
        elapsed_ms=_int(stats, "time_elapsed"),
        data_total_bytes=_int(stats, "data_total"),
        data_processed_bytes=_int(stats, "data_processed"),
        data_remaining_bytes=_int(stats, "data_remaining"),
        memory_total_bytes=_int(stats, "memory_total"),
        memory_processed_bytes=_int(stats, "memory_processed"),
        memory_remaining_bytes=_int(stats, "memory_remaining"),
        memory_iteration=_int(stats, "memory_iteration"),
        memory_dirty_rate_pages_s=_int(stats, "memory_dirty_rate"),
        disk_total_bytes=_int(stats, "disk_total"),
        disk_processed_bytes=_int(stats, "disk_processed"),
        disk_remaining_bytes=_int(stats, "disk_remaining"),
        expected_downtime_ms=_int(stats, "downtime"),
    )


def migration_result(duration_ms: int, stats: dict[str, Any],
                     last: MigrationProgress | None = None) -> MigrationResult:
    """A migration's result from its wall time, the completed job's stats (may be empty) and
    the last figures while it ran (for the disks, which the completed job does not count: a
    migration that succeeded copied the whole disk total)."""
    memory = _int(stats, "memory_processed")
    disk = _int(stats, "disk_processed") or None
    if disk is None and last is not None:
        disk = last.disk_total_bytes or None
    data = _int(stats, "data_processed")
    if data is not None and disk is not None and not _int(stats, "disk_processed"):
        data += disk
    return MigrationResult(
        duration_ms=duration_ms,
        downtime_ms=_int(stats, "downtime"),
        transferred_bytes=data,
        memory_bytes=memory,
        disk_bytes=disk,
        memory_iterations=_int(stats, "memory_iteration"),
        job_elapsed_ms=_int(stats, "time_elapsed"),
    )


def past_timeout(elapsed_s: float, timeout_s: float | None) -> bool:
    """Whether a migration running for ``elapsed_s`` is to be aborted (None: never)."""
    return timeout_s is not None and elapsed_s > timeout_s


def ready_for_postcopy(figures: MigrationProgress) -> bool:
    """Whether a migration asked for post-copy may switch: its first pass over memory done."""
    return (figures.memory_iteration or 0) >= POSTCOPY_AFTER_ITERATION


async def watch(
    call: Awaitable[None],
    job: MigrationJob,
    *,
    timeout_s: float | None,
    postcopy: bool,
    progress: Callable[[MigrationProgress], None] | None,
) -> Watched:
    """Await the migration ``call``, reading ``job``'s figures every :data:`MIGRATION_POLL_S`
    and passing each new one to ``progress``; with ``postcopy``, switch once
    :func:`ready_for_postcopy`. Past ``timeout_s`` the job is aborted and, if the call then
    fails, :class:`MigrationTimeoutError` raised (a job that was already finishing completes).
    Cancelled (or ``progress`` raising), it aborts the job, gives the call
    :data:`MIGRATION_ABORT_WAIT_S` to wind down, and raises on."""
    started = time.monotonic()
    task = asyncio.ensure_future(call)
    aborted = switched = False
    last: MigrationProgress | None = None
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=MIGRATION_POLL_S)
            if task.done():
                break
            if not aborted and past_timeout(time.monotonic() - started, timeout_s):
                aborted = True
                await _abort(job)
            elif not aborted:
                figures = await _stats(job)
                if figures is not None:
                    last = figures
                    if progress is not None:
                        progress(figures)
                    if postcopy and not switched and ready_for_postcopy(figures):
                        switched = True
                        with contextlib.suppress(HypervisorError):
                            await job.start_postcopy()
    except BaseException:  # cancelled (or progress raised): the guest stays here
        if not task.done():
            await asyncio.shield(_abort(job))
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), MIGRATION_ABORT_WAIT_S)
        raise
    duration_ms = round((time.monotonic() - started) * 1000)
    try:
        task.result()
    except HypervisorError as exc:
        if aborted and timeout_s is not None:
            raise MigrationTimeoutError(
                f"migration aborted after {timeout_s:g} s: {exc}", exc.code, timeout_s
            ) from None
        raise
    return Watched(duration_ms, last)


async def _stats(job: MigrationJob) -> MigrationProgress | None:
    """The job's figures; None also when they could not be read (the job may just have ended)."""
    try:
        return await job.stats()
    except HypervisorError:
        return None


async def _abort(job: MigrationJob) -> None:
    """Abort the job; one that already ended is fine."""
    with contextlib.suppress(HypervisorError):
        await job.abort()
