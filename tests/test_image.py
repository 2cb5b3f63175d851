"""The container image built for real and run: scripts/image-check.sh (docs/deploy.md, "Building the image").

No Docker engine and no image registry here: the script makes a Debian base with debootstrap, builds the
Dockerfile on it with buildah, runs `sidecar serve` from the image with podman and passes one session through
it with the openai SDK. Cold (base and image not cached) it takes about 4 to 6 minutes here; warm about 35 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "image-check.sh"
#: The script bounds each step itself; this only stops a hung run.
TIMEOUT_S = 1800


def test_the_image_builds_serves_one_session_and_stops_on_sigterm() -> None:
    """The Dockerfile builds on a local base; `sidecar serve` from it relays an SDK session; SIGTERM exits 0."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("IMAGE_CONTEXT", None)  # always the repository itself
    result = subprocess.run(
        [str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    assert "image-check: [6/7] one session with the openai SDK ok" in result.stdout
    assert "image-check: [7/7] SIGTERM ok" in result.stdout
