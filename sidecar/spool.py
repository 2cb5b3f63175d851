"""A durable local spool for usage events that could not be published yet (docs/api.md, "Metering and
billing": every session produces exactly one billing record, so no usage event may be lost).

Pure file I/O with a synchronous API; the publisher calls it from a worker thread. Not thread-safe:
one caller at a time.

Layout: each process owns two files in the directory, named `<name>.<tag>.<pid>.<token>.*`, where `<tag>` is
the first 12 hex digits of the sha256 of the spool's sink (see below; the random token keeps names unique
across PID namespaces and PID reuse):

- `.jsonl`: a header line `{"spool_sink": "<sink>"}`, then one event per line, `orjson` of
  `UsageEvent.to_fields()`, appended with flush + fsync (an event orjson refuses, text with a lone surrogate,
  is written as ASCII JSON by the standard library instead, so that it is spooled, and later dead-lettered
  by billing, rather than held in memory);
- `.lock`:  held with `flock(LOCK_EX)` for the life of the `Spool`. The kernel releases it when the
  process dies, so "its lock can be taken" means "its owner is dead". The lock file is created under a
  temporary name, locked, then renamed into place, so nobody can ever see it unlocked while its owner
  lives.

The sink is where the events are meant to be billed, named without secrets (`redis:<host>:<port>/<db>#<stream>`,
`db:<dialect>://<host>:<port>/<database>`, `db:sqlite:<absolute path>`: sidecar/publisher.py). Every usage event
reaches the ledger it was written for and no other, so on opening a `Spool` adopts only the files of its own
sink whose owner is dead: holding that owner's lock, it copies the readable events into its own file (fsync),
then deletes the dead files. A dead owner's file of another sink, or from before files named their sink
(`<name>.<pid>.<token>.jsonl`: its sink is unknown), is left in place and reported (`foreign`, one warning
each): a sidecar of that sink adopts it, or an operator who knows its sink renames it to that sink's tag.
A dead owner's lock with no data file is removed whatever its sink (there is nothing to bill). Older
versions ignore tagged names, so a downgrade never adopts them either. Telling a dead foreign owner from a
live one takes its lock for an instant: a sidecar of that sink starting at that very instant skips the
file until its next start (it is delayed, never lost or billed elsewhere). Two live processes cannot
adopt the same file, as only one can hold the lock. A crash between the copy and the delete replays
those events twice, which the consumer's idempotency on `event_id` absorbs. Adopted files are taken
oldest (by modification time) first. The directory must be on a local filesystem (flock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import orjson

from sidecar.usage import UsageDecodeError, UsageEvent

log = logging.getLogger(__name__)

DATA_SUFFIX = ".jsonl"
LOCK_SUFFIX = ".lock"
TMP_SUFFIX = ".tmp"
HEADER_KEY: Final = "spool_sink"
HEADER_PREFIX: Final = b'{"spool_sink":'  # how orjson writes the header's first field
TAG_CHARS: Final = 12
#: The sink of a Spool that is not told its own: for tests and tools where a directory serves one sink.
UNNAMED_SINK: Final = "unnamed"


def sink_tag(sink: str) -> str:
    """The short hash of `sink` that names its spool files."""
    return hashlib.sha256(sink.encode("utf-8")).hexdigest()[:TAG_CHARS]


@dataclass(frozen=True)
class ForeignFile:
    """A dead process's spool file that belongs to another sink: left in place, not adopted."""

    name: str
    #: The sink its header names; None when unknown (a file from before spool files named their sink).
    sink: str | None
    events: int


class Spool:
    """Usage events waiting for publication, oldest first, durable across crashes and restarts."""

    def __init__(self, directory: Path, *, sink: str = UNNAMED_SINK, name: str = "usage") -> None:
        """Create `directory` if needed, take this process's lock and adopt the files of dead processes of the
        same `sink`; the dead processes' files of other sinks are left in place and listed in `foreign`.

        Raises OSError when the directory or the files cannot be created.
        """
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        # group 1: the stem; group 2: the sink's tag, absent from the names of files older than tags.
        self._pattern = re.compile(
            rf"^({re.escape(name)}\.(?:([0-9a-f]{{{TAG_CHARS}}})\.)?\d+\.[0-9a-f]+)({DATA_SUFFIX}|{LOCK_SUFFIX})$"
        )
        self._sink = sink
        self._tag = sink_tag(sink)
        self._header = orjson.dumps({HEADER_KEY: sink}) + b"\n"
        self._stem = f"{name}.{self._tag}.{os.getpid()}.{secrets.token_hex(6)}"
        self._path = self._dir / f"{self._stem}{DATA_SUFFIX}"
        self._count = 0
        #: Dead processes' files of other sinks (or of an unknown one), found on opening, oldest first.
        self.foreign: tuple[ForeignFile, ...] = ()
        self._lock_fd: int | None = self._take_own_lock()
        try:
            self._adopt()
        except BaseException:
            self.close()
            raise

    @property
    def sink(self) -> str:
        """The sink this spool's events are for."""
        return self._sink

    @property
    def path(self) -> Path:
        """This process's spool file (it exists once something was appended)."""
        return self._path

    def __len__(self) -> int:
        """The number of events waiting."""
        return self._count

    def append(self, events: Sequence[UsageEvent]) -> None:
        """Append `events` after everything already spooled, durably (fsync) or not at all.

        Raises OSError (nothing is appended then) or ValueError when the spool is closed.
        """
        if events:
            self._write(b"".join(_line(event) + b"\n" for event in events), len(events))

    def pending(self, limit: int | None = None) -> list[UsageEvent]:
        """The oldest `limit` (default all) events, oldest first. Unreadable lines (a torn last line
        left by a crash mid-write) are skipped."""
        events: list[UsageEvent] = []
        if limit is not None and limit <= 0:
            return events
        for _, event in _records(self._path):
            events.append(event)
            if len(events) == limit:
                return events
        self._count = len(events)  # read to the end: the exact depth
        return events

    def drop_first(self, n: int) -> None:
        """Remove the `n` oldest events (an atomic rewrite: a temporary file, fsync, os.replace).

        Raises OSError (nothing is removed then) or ValueError when the spool is closed.
        """
        self._check_open()
        if n <= 0 or not self._path.exists():
            return
        tmp = self._path.with_name(self._path.name + TMP_SUFFIX)
        kept = 0
        with open(tmp, "wb") as out:
            out.write(self._header)
            for index, (line, _) in enumerate(_records(self._path)):
                if index >= n:
                    out.write(line + b"\n")
                    kept += 1
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)
        _fsync_dir(self._dir)
        self._count = kept

    def close(self) -> None:
        """Release this process's lock. An empty spool removes its files; a non-empty one leaves them
        for the next process to adopt."""
        if self._lock_fd is None:
            return
        if self._count == 0:
            for suffix in (DATA_SUFFIX, DATA_SUFFIX + TMP_SUFFIX, LOCK_SUFFIX):
                (self._dir / f"{self._stem}{suffix}").unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _take_own_lock(self) -> int:
        # Locked before it becomes visible under its real name: see the module docstring.
        staging = self._dir / f".{self._stem}.locking"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, self._dir / f"{self._stem}{LOCK_SUFFIX}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _adopt(self) -> None:
        tags = {m.group(1): m.group(2) for p in self._dir.iterdir() if (m := self._pattern.match(p.name))}
        tags.pop(self._stem, None)
        foreign: list[str] = []
        for stem in sorted(tags, key=self._age):
            fd = _try_lock(self._dir / f"{stem}{LOCK_SUFFIX}")
            if fd is None:
                continue  # its owner is alive
            try:
                data = self._dir / f"{stem}{DATA_SUFFIX}"
                # Own tag without a header: a first write torn by a crash, or a file an operator renamed.
                if tags[stem] == self._tag and _header_sink(data) in (self._sink, None):
                    self._take_over(stem)
                elif not data.exists():
                    self._remove(stem)  # a dead owner that spooled nothing: nothing to bill, whatever its sink
                else:
                    foreign.append(stem)
            finally:
                os.close(fd)  # before reading a foreign file: its own sink's sidecar may be adopting it now
        described = [(stem, f) for stem in foreign if (f := self._describe(stem)) is not None]
        self.foreign = tuple(f for _, f in described)
        for stem, f in described:
            unknown = (
                "unknown: its header is torn" if tags[stem] else "unknown: written before spool files named their sink"
            )
            log.warning(
                "usage spool file %s holds %d usage events for another sink (%s): not adopted, left in place",
                f.name,
                f.events,
                f.sink or unknown,
            )

    def _describe(self, stem: str) -> ForeignFile | None:
        """A foreign file's sink and event count; None when it is gone (its own sink adopted it meanwhile)."""
        data = self._dir / f"{stem}{DATA_SUFFIX}"
        try:
            return ForeignFile(data.name, _header_sink(data), sum(1 for _ in _records(data)))
        except FileNotFoundError:
            return None

    def _take_over(self, stem: str) -> None:
        data = self._dir / f"{stem}{DATA_SUFFIX}"
        lines = [line + b"\n" for line, _ in _records(data)]
        if lines:
            self._write(b"".join(lines), len(lines))
            log.info("adopted %d spooled usage events from %s", len(lines), data.name)
        self._remove(stem)

    def _remove(self, stem: str) -> None:
        # Data before lock: a data file never outlives its lock file while it is being adopted.
        for suffix in (DATA_SUFFIX, DATA_SUFFIX + TMP_SUFFIX, LOCK_SUFFIX):
            (self._dir / f"{stem}{suffix}").unlink(missing_ok=True)

    def _age(self, stem: str) -> float:
        try:
            return (self._dir / f"{stem}{DATA_SUFFIX}").stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _write(self, data: bytes, count: int) -> None:
        self._check_open()
        created = not self._path.exists()
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                data = self._header + data  # the sink first: nobody ever sees events whose sink is unnamed
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # leave no torn line for the next append to join
                raise
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self._dir)
        self._count += count

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise ValueError("the spool is closed")


def _records(path: Path) -> Iterator[tuple[bytes, UsageEvent]]:
    """(line without its newline, event) for each readable line of `path` after its header; none if it does not
    exist. Raises FileNotFoundError only when the file goes while being opened (a foreign file being adopted)."""
    if not path.exists():  # our own file, a locked dead one, or a foreign one (then _describe catches the race)
        return
    with open(path, "rb") as file:
        for index, raw in enumerate(file):
            line = raw.rstrip(b"\n")
            if not line or (index == 0 and line.startswith(HEADER_PREFIX)):
                continue
            event = _parse(line)
            if event is None:
                log.warning("skipped an unreadable line in the usage spool %s", path.name)
                continue
            yield line, event


def _header_sink(path: Path) -> str | None:
    """The sink named by the header of `path`; None without a readable header (or without the file)."""
    try:
        with open(path, "rb") as file:
            first = file.readline().rstrip(b"\n")
    except FileNotFoundError:
        return None
    if not first.startswith(HEADER_PREFIX):
        return None
    with contextlib.suppress(ValueError):  # a header torn by a crash (orjson.JSONDecodeError is a ValueError)
        header = orjson.loads(first)
        if isinstance(header, dict) and isinstance(sink := header.get(HEADER_KEY), str):
            return sink
    return None


def _line(event: UsageEvent) -> bytes:
    fields = event.to_fields()
    try:
        return orjson.dumps(fields)
    except orjson.JSONEncodeError:  # a lone surrogate: \udXXX escapes, which the standard library reads back
        return json.dumps(fields, ensure_ascii=True).encode("ascii")


def _load(line: bytes) -> object:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)  # a line `_line` wrote with the standard library; raises ValueError if torn


def _parse(line: bytes) -> UsageEvent | None:
    try:
        data = _load(line)
        if not isinstance(data, dict):
            return None
        return UsageEvent.from_fields(data)
    except (ValueError, TypeError, AttributeError, UsageDecodeError):
        return None  # ValueError covers orjson.JSONDecodeError; the others are well-formed JSON of a wrong shape


def _try_lock(path: Path) -> int | None:
    """A descriptor holding `path`'s exclusive lock, or None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
