"""`make run` and the README's example, as a newcomer runs them from a clone: the fake provider and the sidecar
in one process, examples/transcribe.py printing the transcript, and one clear line when a port is taken."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.testing.fake_provider import DEFAULT_TRANSCRIPT
from tests.support import bound_socket

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 60  # a safety net for a hung process, never a synchronisation


def free_port() -> int:
    with bound_socket() as sock:
        port: int = sock.getsockname()[1]
    return port


def devstack_env(tmp_path: Path, *, fake_port: int, sidecar_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "FAKE_PROVIDER"))}
    env.update(
        FAKE_PROVIDER_PORT=str(fake_port),
        SIDECAR_PORT=str(sidecar_port),
        SIDECAR_DATABASE_URL=f"sqlite:///{tmp_path / 'billing.db'}",
        SIDECAR_SPOOL_DIR=str(tmp_path / "spool"),
    )
    return env


@pytest.fixture
def devstack(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`make run`'s process on free ports, up once it printed where the sidecar listens."""
    port = free_port()
    env = devstack_env(tmp_path, fake_port=free_port(), sidecar_port=port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.testing.devstack"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("sidecar on"):
            break
    yield proc, port
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=DEADLINE_S)


def test_the_readme_example_prints_a_transcript(devstack: tuple[subprocess.Popen[str], int]) -> None:
    """examples/transcribe.py on the repository's own speech file prints the fake provider's transcript."""
    _, port = devstack
    env = {**os.environ, "SIDECAR_URL": f"http://127.0.0.1:{port}/v1"}
    result = subprocess.run(
        [sys.executable, "examples/transcribe.py", "examples/audio/speech_24k_pcm16.wav"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"transcript: {DEFAULT_TRANSCRIPT}" in result.stdout


@pytest.mark.parametrize("taken", ["fake", "sidecar"])
def test_a_port_already_taken_is_one_line_and_exit_2(tmp_path: Path, taken: str) -> None:
    """A port in use stops `make run` at start with one line naming the variable that moves it."""
    with bound_socket() as busy:
        port = busy.getsockname()[1]
        ports = {"fake_port": port, "sidecar_port": free_port()}
        if taken == "sidecar":
            ports = {"fake_port": free_port(), "sidecar_port": port}
        result = subprocess.run(
            [sys.executable, "-m", "sidecar.testing.devstack"],
            cwd=ROOT,
            env=devstack_env(tmp_path, **ports),
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
            check=False,
        )
    variable = "FAKE_PROVIDER_PORT" if taken == "fake" else "SIDECAR_PORT"
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"make run: port {port} ({'the fake provider' if taken == 'fake' else 'the sidecar'}) is already in use; "
        f"set {variable} to another port"
    ]
