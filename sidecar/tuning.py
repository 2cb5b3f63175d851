"""Process-level tuning for the relay's hot path, each measured with `make bench` (docs/performance.md).

- Garbage collection: every relayed frame allocates a few short-lived dicts (ASGI messages, parsed
  events), so the default generation-0 threshold (700 allocations) runs a collection every few frames.
  The relay's objects do not form cycles on that path; a higher threshold keeps collections rare, and
  `gc.freeze()` moves everything alive after startup (modules, the catalog) out of the collector's way.
- Masking keys: a WebSocket client masks every frame with 4 random bytes (RFC 6455 section 5.3), which
  websockets takes from `secrets.token_bytes(4)`: one getrandom system call per frame. A pool of bytes
  from the same `os.urandom`, refilled every 16,384 frames (and after a fork), keeps them cryptographically
  random with far fewer system calls.
- Memory: `sidecar serve` runs on the C library's allocator (PYTHONMALLOC=malloc, re-executing itself once
  when the variable is unset). CPython's own allocator keeps a 1 MiB arena as long as one object in it
  lives, so a burst of sessions left ~27 MB of 42 MB behind; with malloc and `malloc_trim`, ~9 MB, at the
  same CPU per frame. An explicit PYTHONMALLOC (e.g. `pymalloc`) is left alone. Shortly after the last
  session of a burst ends, a full collection frees what cycles the high threshold left behind, and
  `malloc_trim` hands freed heap pages back to the OS; under steady churn, where no burst ends, the same runs
  every 1,000 ended sessions, at most once per 30 s (control.CHURN_RELEASE_SESSIONS, `make soak`).
- Open files: every client connection is a file descriptor, and a relayed session holds a second one (its
  upstream). The usual soft limit of 1024 let ~1,100 idle connections exhaust it, and with it the sockets
  Redis, the billing DB and the spool need. `sidecar serve` raises its soft limit to the hard limit (workers
  inherit it), and `connection_cap` lowers the connection cap to what that limit can hold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
from collections.abc import Mapping, Sequence
from typing import Final

GC_THRESHOLD: Final = (50_000, 20, 20)
#: Descriptors kept for what is not a client connection or its upstream: listening socket, Redis, DB, spool, logs.
RESERVED_FDS: Final = 256
#: The soft limit asked for when the hard limit is unlimited (Linux refuses more than fs.nr_open, 1 << 20 by default).
UNLIMITED_FDS: Final = 1 << 20
_POOL_BYTES: Final = 65536


class PooledSecrets:
    """The `token_bytes` of the `secrets` module, served from a pool of `os.urandom` bytes."""

    def __init__(self, size: int = _POOL_BYTES) -> None:
        self._size = size
        self._pool = b""
        self._pos = 0
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        """Forget the pool (a forked child must not reuse its parent's bytes)."""
        self._pool, self._pos = b"", 0

    def token_bytes(self, nbytes: int) -> bytes:
        """`nbytes` cryptographically random bytes."""
        end = self._pos + nbytes
        if end > len(self._pool):
            self._pool, self._pos, end = os.urandom(max(self._size, nbytes)), 0, nbytes
        out = self._pool[self._pos : end]
        self._pos = end
        return out


def pool_mask_randomness() -> None:
    """Make websockets draw its client masking keys from a PooledSecrets (idempotent)."""
    import websockets.frames

    frames = websockets.frames
    if not isinstance(getattr(frames, "secrets", None), PooledSecrets):
        setattr(frames, "secrets", PooledSecrets())  # noqa: B010 (websockets does not export the name)


def settle_gc() -> None:
    """After startup: collect once, freeze what is alive, and raise the generation-0 threshold."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


_LIBC = ctypes.util.find_library("c")
_malloc_trim = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None


def release_memory() -> None:
    """Collect garbage, then give freed heap memory back to the OS (glibc's malloc_trim; skipped elsewhere)."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


ALLOCATOR_VARIABLE: Final = "PYTHONMALLOC"


def system_malloc_command(environ: Mapping[str, str], orig_argv: Sequence[str]) -> list[str] | None:
    """The command line to re-execute with PYTHONMALLOC=malloc; None when the variable is already set."""
    if ALLOCATOR_VARIABLE in environ or not orig_argv:
        return None
    return [sys.executable, *orig_argv[1:]]


def use_system_malloc() -> None:
    """Re-execute this process (same pid, same arguments) on the C allocator, unless PYTHONMALLOC is set."""
    command = system_malloc_command(os.environ, sys.orig_argv)
    if command is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(command[0], command, {**os.environ, ALLOCATOR_VARIABLE: "malloc"})


def raise_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (children inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = UNLIMITED_FDS if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):  # e.g. a hard limit above fs.nr_open: keep what we have
        return soft
    return wanted


def open_file_limit() -> int | None:
    """This process's soft open-file limit; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(max_connections: int, *, open_files: int | None) -> int:
    """The largest connection cap, up to `max_connections`, that `open_files` descriptors hold (None: no limit).

    Each client connection may hold an upstream connection too, and RESERVED_FDS stay for everything else.
    """
    if open_files is None:
        return max_connections
    return max(1, min(max_connections, (open_files - RESERVED_FDS) // 2))
