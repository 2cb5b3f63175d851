"""The durable usage spool: JSON lines, torn lines, atomic drops, adoption of dead processes' files of its own
sink only (files of other sinks, or of an unknown one, are left in place and reported)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from sidecar.spool import ForeignFile, Spool, sink_tag
from sidecar.testing.factories import usage_event
from sidecar.usage import UsageEvent

ROOT = Path(__file__).resolve().parents[1]
REDIS_SINK = "redis:127.0.0.1:6379/0#realtime:usage"
DB_SINK = "db:sqlite:/var/lib/sidecar/billing.db"
STARTED = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def event(seq: int, *, session_id: str = "sess_1", final: bool = False) -> UsageEvent:
    """A usage event with every field set (a final one also ends and has upstream usage)."""
    return usage_event(
        session_id, seq, final=final, started_at=STARTED, upstream_usage='{"seconds": 5}' if final else ""
    )


def spool_files(directory: Path) -> list[str]:
    """The data and lock files in a spool directory."""
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".jsonl", ".lock"))


def test_append_then_pending_round_trips_events(tmp_path: Path) -> None:
    """Appended events come back equal and oldest first; the depth counts them."""
    events = [event(1), event(2), event(3, final=True)]
    with Spool(tmp_path / "spool") as spool:
        spool.append(events[:2])
        spool.append(events[2:])
        assert spool.pending() == events
        assert len(spool) == 3


def test_pending_limit_returns_the_oldest(tmp_path: Path) -> None:
    """pending(limit) returns only the oldest `limit` events."""
    events = [event(seq) for seq in range(1, 6)]
    with Spool(tmp_path) as spool:
        spool.append(events)
        assert spool.pending(2) == events[:2]
        assert len(spool) == 5


def test_lines_are_json_of_the_stream_fields_after_a_header_naming_the_sink(tmp_path: Path) -> None:
    """The first line names the sink; each event line is the JSON object of the event's stream fields."""
    one = event(1, final=True)
    with Spool(tmp_path, sink=REDIS_SINK) as spool:
        spool.append([one])
        header, line = spool.path.read_bytes().splitlines(keepends=True)
    assert orjson.loads(header) == {"spool_sink": REDIS_SINK}
    assert line.endswith(b"\n")
    assert orjson.loads(line) == one.to_fields()


def test_file_names_carry_the_sinks_tag(tmp_path: Path) -> None:
    """A spool's files are named after its sink's tag; the tag is a short hash, not the sink (no host, no path)."""
    with Spool(tmp_path, sink=REDIS_SINK) as spool:
        spool.append([event(1)])
        assert spool.path.name.startswith(f"usage.{sink_tag(REDIS_SINK)}.{os.getpid()}.")
        assert spool.sink == REDIS_SINK
    assert sink_tag(REDIS_SINK) != sink_tag(DB_SINK)
    assert len(sink_tag(REDIS_SINK)) == 12 and "127.0.0.1" not in sink_tag(REDIS_SINK)


def test_header_survives_drop_first(tmp_path: Path) -> None:
    """After drop_first rewrites the file the header is still first, and the reopened spool of that sink adopts it."""
    events = [event(1), event(2)]
    with Spool(tmp_path, sink=DB_SINK) as spool:
        spool.append(events)
        spool.drop_first(1)
        assert orjson.loads(spool.path.read_bytes().splitlines()[0]) == {"spool_sink": DB_SINK}
        assert spool.pending() == events[1:]
    with Spool(tmp_path, sink=DB_SINK) as reopened:
        assert reopened.pending() == events[1:]
        assert reopened.foreign == ()


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    """A last line cut short by a crash mid-write is skipped, now and after reopening."""
    events = [event(1), event(2)]
    with Spool(tmp_path) as spool:
        spool.append(events)
        with open(spool.path, "ab") as file:
            file.write(b'{"event_id": "torn", "schema": "realt')
        assert spool.pending() == events
    with Spool(tmp_path) as reopened:
        assert reopened.pending() == events
        assert len(reopened) == 2


def test_drop_first_removes_the_oldest(tmp_path: Path) -> None:
    """drop_first(n) removes exactly the n oldest events and leaves no temporary file."""
    events = [event(seq) for seq in range(1, 6)]
    with Spool(tmp_path) as spool:
        spool.append(events)
        spool.drop_first(2)
        assert spool.pending() == events[2:]
        assert len(spool) == 3
        spool.append([events[0]])
        assert spool.pending() == [*events[2:], events[0]]
        spool.drop_first(10)
        assert spool.pending() == []
        assert len(spool) == 0
        assert not list(tmp_path.glob("*.tmp"))


def test_reopening_sees_old_events(tmp_path: Path) -> None:
    """A new Spool on the same directory sees the events a closed one left behind."""
    events = [event(1), event(2)]
    with Spool(tmp_path) as first:
        first.append(events)
    with Spool(tmp_path) as second:
        assert second.pending() == events
        assert len(second) == 2
        assert spool_files(tmp_path) == [second.path.name, second.path.name.replace(".jsonl", ".lock")]


def test_empty_spool_removes_its_files_on_close(tmp_path: Path) -> None:
    """Closing an empty spool leaves nothing behind."""
    with Spool(tmp_path) as spool:
        spool.append([event(1)])
        spool.drop_first(1)
    assert spool_files(tmp_path) == []


def test_closed_spool_refuses_appends(tmp_path: Path) -> None:
    """Appending after close raises instead of writing a file another process may adopt."""
    spool = Spool(tmp_path)
    spool.close()
    with pytest.raises(ValueError, match="closed"):
        spool.append([event(1)])


def test_adopts_the_file_of_a_dead_process(tmp_path: Path) -> None:
    """Events a crashed process spooled are taken over by the next process, and by one only."""
    events = [event(1), event(2, final=True)]
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "import orjson\n"
        "from sidecar.spool import Spool\n"
        "from sidecar.usage import UsageEvent\n"
        "spool = Spool(Path(sys.argv[1]))\n"
        "spool.append([UsageEvent.from_fields(orjson.loads(line)) for line in sys.stdin.buffer])\n"
        "os._exit(0)  # dies without close(): the kernel releases its lock\n"
    )
    payload = b"".join(orjson.dumps(e.to_fields()) + b"\n" for e in events)
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path)], input=payload, cwd=ROOT, check=True)
    assert child.returncode == 0
    assert len(spool_files(tmp_path)) == 2  # the dead child's data and lock files
    with Spool(tmp_path) as adopter, Spool(tmp_path) as latecomer:
        assert adopter.pending() == events
        assert latecomer.pending() == []
        assert len(spool_files(tmp_path)) == 3  # the adopter's two files and the latecomer's lock


def test_does_not_adopt_a_live_spool(tmp_path: Path) -> None:
    """A spool whose owner still holds its lock is left alone."""
    one = event(1)
    with Spool(tmp_path) as live:
        live.append([one])
        with Spool(tmp_path) as other:
            assert other.pending() == []
        assert live.pending() == [one]


def test_several_dead_files_are_adopted_oldest_first(tmp_path: Path) -> None:
    """Files of several dead owners are merged, the least recently written file's events first."""
    newer, older = [event(1, session_id="b")], [event(1, session_id="a")]
    with Spool(tmp_path) as first, Spool(tmp_path) as second:
        first.append(newer)
        second.append(older)
        os.utime(first.path, (2_000_000_000, 2_000_000_000))
        os.utime(second.path, (1_000_000_000, 1_000_000_000))
    with Spool(tmp_path) as adopter:
        assert adopter.pending() == [*older, *newer]


def write_dead(directory: Path, sink: str, events: list[UsageEvent]) -> Path:
    """A file of `sink` whose owner is gone (closed with events still spooled, which releases its lock)."""
    with Spool(directory, sink=sink) as spool:
        spool.append(events)
        return spool.path


def test_a_dead_file_of_another_sink_is_left_in_place_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dead Redis-mode file is not adopted by an embedded-mode spool: left byte for byte, one warning naming its
    sink and event count; a spool of its own sink then adopts it."""
    events = [event(1), event(2, final=True)]
    path = write_dead(tmp_path, REDIS_SINK, events)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="sidecar.spool"), Spool(tmp_path, sink=DB_SINK) as embedded:
        assert embedded.pending() == []
        assert embedded.foreign == (ForeignFile(path.name, REDIS_SINK, 2),)
    assert path.read_bytes() == before
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "sidecar.spool"]
    assert warning == (
        f"usage spool file {path.name} holds 2 usage events for another sink ({REDIS_SINK}): not adopted, left in place"
    )
    with Spool(tmp_path, sink=REDIS_SINK) as redis_mode:
        assert redis_mode.pending() == events
        assert redis_mode.foreign == ()
    assert not path.exists()


def test_a_file_from_before_sinks_is_never_adopted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A dead file without a sink (the old `usage.<pid>.<token>` name) is reported as of an unknown sink and left
    in place, whichever sink opens the directory."""
    events = [event(1), event(2)]
    legacy = tmp_path / "usage.4242.0123456789ab.jsonl"
    legacy.write_bytes(b"".join(orjson.dumps(e.to_fields()) + b"\n" for e in events))
    (tmp_path / "usage.4242.0123456789ab.lock").touch()
    with caplog.at_level(logging.WARNING, logger="sidecar.spool"):
        for sink in (REDIS_SINK, DB_SINK):
            with Spool(tmp_path, sink=sink) as spool:
                assert spool.pending() == []
                assert spool.foreign == (ForeignFile(legacy.name, None, 2),)
    assert legacy.exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "sidecar.spool"]
    assert (
        warnings
        == [
            f"usage spool file {legacy.name} holds 2 usage events for another sink "
            "(unknown: written before spool files named their sink): not adopted, left in place"
        ]
        * 2
    )


def test_a_file_renamed_to_a_sinks_tag_is_adopted_by_that_sink(tmp_path: Path) -> None:
    """An operator who knows an old file's sink renames it with that sink's tag: that sink adopts it."""
    events = [event(1), event(2)]
    legacy = tmp_path / "usage.4242.0123456789ab.jsonl"
    legacy.write_bytes(b"".join(orjson.dumps(e.to_fields()) + b"\n" for e in events))
    legacy.rename(tmp_path / f"usage.{sink_tag(REDIS_SINK)}.4242.0123456789ab.jsonl")
    with Spool(tmp_path, sink=DB_SINK) as other:
        assert other.pending() == []
    with Spool(tmp_path, sink=REDIS_SINK) as spool:
        assert spool.pending() == events
        assert spool.foreign == ()


def test_a_live_file_of_another_sink_is_not_reported(tmp_path: Path) -> None:
    """A file whose owner still runs is its owner's business: neither adopted nor reported."""
    one = event(1)
    with Spool(tmp_path, sink=REDIS_SINK) as live:
        live.append([one])
        with Spool(tmp_path, sink=DB_SINK) as other:
            assert (other.pending(), other.foreign) == ([], ())
        assert live.pending() == [one]


def test_a_dead_lock_without_data_is_removed_whatever_its_sink(tmp_path: Path) -> None:
    """A dead process of another sink that spooled nothing leaves nothing behind once a spool opens."""
    crashed = tmp_path / f"usage.{sink_tag(REDIS_SINK)}.4242.0123456789ab.lock"
    crashed.touch()
    with Spool(tmp_path, sink=DB_SINK) as spool:
        assert spool.foreign == ()
    assert not crashed.exists()
