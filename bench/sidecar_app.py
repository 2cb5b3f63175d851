"""An app factory for `uvicorn --factory bench.sidecar_app:app --workers N` (the two-worker measurement).

`sidecar serve` hands uvicorn an app object, and uvicorn can start several workers only from an import
string; this zero-argument factory builds the same app from the same environment in each worker.
"""

from __future__ import annotations

from bench.launch import use_tree_from_env

use_tree_from_env()  # before importing sidecar: a --rev run measures that revision in every worker

from starlette.applications import Starlette  # noqa: E402 (after the import path is settled)

from sidecar.app import create_app  # noqa: E402
from sidecar.config import Settings  # noqa: E402
from sidecar.logs import configure_logging  # noqa: E402


def app() -> Starlette:
    """`create_app(Settings.from_env())`, with the sidecar's logging, as `sidecar serve` builds it."""
    configure_logging()
    return create_app(Settings.from_env())
