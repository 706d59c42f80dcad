"""The agent's outbox: order, numbering that survives restarts, the bound and its report."""

from __future__ import annotations

from pathlib import Path

from agent.spool import Dropped, Spool


def _payload(seq: int) -> bytes:
    return f"msg-{seq}".encode()


async def test_numbers_in_order_and_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite", max_messages=100)
    await spool.open()
    for _ in range(3):
        assert await spool.append("telemetry", _payload) is None
    await spool.append("events", _payload)
    pending = await spool.pending(10)
    assert [(p.channel, p.seq, p.payload) for p in pending] == [
        ("telemetry", 1, b"msg-1"), ("telemetry", 2, b"msg-2"), ("telemetry", 3, b"msg-3"),
        ("events", 1, b"msg-1"),
    ]
    await spool.remove([p.id for p in pending[:2]])
    await spool.close()

    spool = Spool(tmp_path / "spool.sqlite", max_messages=100)
    await spool.open()
    await spool.append("telemetry", _payload)
    assert [(p.channel, p.seq) for p in await spool.pending(10)] == [
        ("telemetry", 3), ("events", 1), ("telemetry", 4)]
    await spool.close()


async def test_bound_drops_oldest_and_reports_the_range(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite", max_messages=10)
    await spool.open()
    dropped = [await spool.append("telemetry", _payload) for _ in range(13)]
    assert dropped[:10] == [None] * 10
    assert dropped[10:] == [Dropped("telemetry", 1, 1), Dropped("telemetry", 2, 2),
                            Dropped("telemetry", 3, 3)]
    assert [p.seq for p in await spool.pending(100)] == list(range(4, 14))
    # The bound is per channel: events are not pushed out by telemetry.
    await spool.append("events", _payload)
    assert await spool.count() == 11
    await spool.close()
