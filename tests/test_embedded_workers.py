"""Embedded mode (no Redis) keeps claims, leases and budgets per process: several workers are refused at start."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cli import check_workers
from sidecar.config import Settings
from sidecar.errors import ConfigError
from tests.test_cli import sidecar


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port already in use: a `serve` that got as far as binding fails there instead of serving forever."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def _assert_refused(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sidecar: 2 workers need SIDECAR_REDIS_URL"), stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_refuses_several_workers_in_embedded_mode(how: str, busy_port: int, tmp_path: Path) -> None:
    """`sidecar serve --workers 2` (or SIDECAR_WORKERS=2) without SIDECAR_REDIS_URL exits 2 with one line."""
    env = {"SIDECAR_PORT": str(busy_port), "SIDECAR_SPOOL_DIR": str(tmp_path / "spool")}
    args = ["serve", "--workers", "2"] if how == "flag" else ["serve"]
    if how == "env":
        env["SIDECAR_WORKERS"] = "2"
    result = sidecar(*args, env=env)
    assert result.returncode == 2, result.stderr
    _assert_refused(result.stderr)


def test_several_workers_are_allowed_with_redis() -> None:
    """With SIDECAR_REDIS_URL the workers share claims and leases, so any number is accepted."""
    settings = Settings(litellm_config=Path("config.yaml"), redis_url="redis://127.0.0.1:6379/0")
    check_workers(settings, 4)


def test_one_worker_is_allowed_in_embedded_mode() -> None:
    """Embedded mode with one worker starts as before; two raise ConfigError."""
    settings = Settings(litellm_config=Path("config.yaml"))
    check_workers(settings, 1)
    with pytest.raises(ConfigError, match="SIDECAR_REDIS_URL"):
        check_workers(settings, 2)
