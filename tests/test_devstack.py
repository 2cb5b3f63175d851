"""`make run` and the README's example, as a newcomer runs them from a clone: the fake provider and the sidecar
in one process, examples/transcribe.py printing the transcript, and one clear line when a port is taken."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.config import Settings
from sidecar.smoke import EXIT_OK, run_smoke
from sidecar.testing.devstack import EXAMPLE_CONFIG, FAKE_KEY, FAKE_URL
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
def devstack(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """`make run`'s process on free ports (the sidecar's, the fake provider's), up once it printed where the
    sidecar listens."""
    port, fake = free_port(), free_port()
    env = devstack_env(tmp_path, fake_port=fake, sidecar_port=port)
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
    yield proc, port, fake
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=DEADLINE_S)


def test_the_readme_example_prints_a_transcript(devstack: tuple[subprocess.Popen[str], int, int]) -> None:
    """examples/transcribe.py on the repository's own speech file prints the fake provider's transcript."""
    _, port, _ = devstack
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


def test_the_fake_serves_gpt_live_and_translation_and_smoke_checks_them(
    devstack: tuple[subprocess.Popen[str], int, int], tmp_path: Path
) -> None:
    """`make run`'s fake provider speaks GPT-Live and realtime translation: `sidecar smoke` on the example
    config (its port rewritten as `make run` rewrites it) passes for gpt-live-1 and gpt-realtime-translate."""
    _, _, fake = devstack
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8").replace(FAKE_URL, f"ws://127.0.0.1:{fake}")
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    for model, answer in (("gpt-live-1", "session.started after"), ("gpt-realtime-translate", "session.created")):
        lines: list[str] = []
        code = asyncio.run(run_smoke(Settings(litellm_config=config), model, out=lines.append))
        assert code == EXIT_OK, lines
        assert answer in lines[1] and FAKE_KEY not in "\n".join(lines)


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
