"""Hot-path tuning: pooled masking randomness stays random and fork-safe; websockets uses it; the allocator."""

from __future__ import annotations

import os
import sys

import websockets.frames

from sidecar import tuning


def test_pool_serves_distinct_random_bytes_and_refills() -> None:
    """Every draw is fresh: no repeats over several refills of a small pool."""
    pool = tuning.PooledSecrets(size=64)
    draws = [pool.token_bytes(4) for _ in range(200)]
    assert all(len(d) == 4 for d in draws)
    assert len(set(draws)) > 190  # 4 random bytes collide with probability ~5e-6 per pair


def test_pool_reset_after_fork() -> None:
    """A forked child draws bytes of its own, not its parent's next ones."""
    pool = tuning.PooledSecrets()
    pool.token_bytes(4)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next draw and leave at once
        os.write(write, pool.token_bytes(16))
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 16)
    assert child != pool.token_bytes(16)


def test_websockets_masks_with_the_pool() -> None:
    """After pool_mask_randomness, websockets' frame serialisation draws from the pool."""
    tuning.pool_mask_randomness()
    assert isinstance(websockets.frames.secrets, tuning.PooledSecrets)  # type: ignore[attr-defined]
    frame = websockets.frames.Frame(websockets.frames.OP_TEXT, b"hello")
    assert len(frame.serialize(mask=True, extensions=[])) == 2 + 4 + 5


def test_serve_reexecutes_on_the_c_allocator_unless_one_is_chosen() -> None:
    """Unset PYTHONMALLOC: the same command line again (under this interpreter); set: left alone."""
    argv = ["/usr/bin/python3", "-m", "sidecar.cli", "serve", "--port", "9"]
    command = tuning.system_malloc_command({}, argv)
    assert command == [sys.executable, "-m", "sidecar.cli", "serve", "--port", "9"]
    assert tuning.system_malloc_command({"PYTHONMALLOC": "pymalloc"}, argv) is None
    assert tuning.system_malloc_command({}, []) is None
