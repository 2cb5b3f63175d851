"""The `sidecar` command line: models, db upgrade, and configuration errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "config.yaml"


def sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m sidecar.cli ...` with the example config (and no provider keys in the environment)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "OPENAI_", "AZURE_"))}
    base["SIDECAR_LITELLM_CONFIG"] = str(EXAMPLE)
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_models_json_lists_realtime_models_only() -> None:
    """`sidecar models --json` shows the example's realtime models with kind, unit and price, not whisper-1."""
    result = sidecar("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["id"]: row for row in json.loads(result.stdout)}
    assert "whisper-1" not in rows
    whisper = rows["gpt-realtime-whisper"]
    assert (whisper["kind"], whisper["unit"]) == ("realtime-transcription", "second")
    assert whisper["pricing"]["input_cost_per_second"] == "0.000283333333333"
    assert rows["gpt-realtime"]["kind"] == "realtime-conversation"
    assert "sk-fake-provider-key" not in result.stdout and "18787" not in result.stdout


def test_models_table_is_human_readable() -> None:
    """`sidecar models` prints a table with one line per model."""
    result = sidecar("models")
    assert result.returncode == 0, result.stderr
    assert "gpt-realtime-whisper" in result.stdout and "realtime-transcription" in result.stdout


def test_missing_config_is_a_clear_error() -> None:
    """Without SIDECAR_LITELLM_CONFIG the command exits 2 with a message naming the variable."""
    result = sidecar("models", env={"SIDECAR_LITELLM_CONFIG": ""})
    assert result.returncode == 2
    assert "SIDECAR_LITELLM_CONFIG" in result.stderr


def test_db_upgrade_creates_tables(tmp_path: Path) -> None:
    """`sidecar db upgrade` creates the billing tables in the configured database."""
    import sqlite3

    db = tmp_path / "billing.db"
    result = sidecar("db", "upgrade", env={"SIDECAR_DATABASE_URL": f"sqlite:///{db}"})
    assert result.returncode == 0, result.stderr
    tables = {row[0] for row in sqlite3.connect(db).execute("select name from sqlite_master where type='table'")}
    assert {"realtime_usage", "realtime_usage_event"} <= tables
