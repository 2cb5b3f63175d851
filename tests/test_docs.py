"""The operator and client docs stay true: every setting documented with the code's default, links resolve,
the quickstart's client snippet runs against a real sidecar, the browser example shows the safe path."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Settings
from tests.relay_stack import USER_KEY, stack

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
API = ROOT / "docs" / "api.md"
QUICKSTART = ROOT / "docs" / "quickstart.md"
EXAMPLES_README = ROOT / "examples" / "README.md"
BROWSER = ROOT / "examples" / "browser.html"
# A variable name as a whole string literal in config.py (messages that mention one do not match).
READ_IN_SOURCE = re.compile(r'"(SIDECAR_[A-Z0-9_]+)"')
TABLE_ROW = re.compile(r"^\| `(SIDECAR_[A-Z0-9_]+)` \| ([^|]+?) \|", re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


class RecordingEnv(dict[str, str]):
    """An environment that records every name Settings.from_env looks up."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def settings_read() -> tuple[set[str], Settings]:
    """The SIDECAR_* variables the code reads (looked up at run time, or named in config.py), and the defaults."""
    env = RecordingEnv({"SIDECAR_LITELLM_CONFIG": "config.yaml"})
    defaults = Settings.from_env(env)
    named = set(READ_IN_SOURCE.findall((ROOT / "sidecar" / "config.py").read_text(encoding="utf-8")))
    return {name for name in env.read if name.startswith("SIDECAR_")} | named, defaults


def documented() -> dict[str, str]:
    """Variable -> its default cell in docs/api.md's settings table (backticks removed)."""
    return {name: cell.strip().strip("`") for name, cell in TABLE_ROW.findall(API.read_text("utf-8"))}


def shown(value: object) -> str:
    """A default as the doc writes it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_every_setting_is_documented() -> None:
    """Every SIDECAR_* variable the code reads has a row in docs/api.md's settings table, and no row is stale."""
    read, _ = settings_read()
    rows = documented()
    assert read - rows.keys() == set(), "undocumented settings"
    assert rows.keys() - read == set(), "documented settings the code no longer reads"


def test_documented_defaults_are_the_code_defaults() -> None:
    """Each documented default is the default Settings.from_env produces."""
    _, defaults = settings_read()
    rows = documented()
    assert rows.pop("SIDECAR_LITELLM_CONFIG") == "required"
    for name, cell in rows.items():
        field = name.removeprefix("SIDECAR_").lower()
        if hasattr(defaults, field):
            assert cell == shown(getattr(defaults, field)), name


@pytest.mark.parametrize("doc", [QUICKSTART, CONFIGURATION, API, EXAMPLES_README], ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    """Every relative link in the doc points at a file or directory of the repository."""
    targets = [link.split("#", 1)[0] for link in LINK.findall(doc.read_text("utf-8"))]
    local = [t for t in targets if t and not t.startswith(("http://", "https://", "mailto:"))]
    assert local, "expected some relative links"
    missing = [t for t in local if not (doc.parent / t).exists()]
    assert missing == []


def test_browser_example_uses_the_subprotocol_and_points_to_client_secrets() -> None:
    """The browser page authenticates with the subprotocol form and sends readers to client secrets."""
    page = BROWSER.read_text("utf-8")
    assert '["realtime", "openai-insecure-api-key." + ' in page
    assert "POST /v1/realtime/client_secrets" in page and "docs/browser.md" in page
    assert "intent=transcription&amp;model=gpt-realtime-whisper" in page


async def test_quickstart_client_snippet_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The quickstart's OpenAI SDK snippet, as written (only URL and key swapped), transcribes via the sidecar."""
    blocks = re.findall(r"```python\n(.*?)```", QUICKSTART.read_text("utf-8"), re.DOTALL)
    snippet = next(block for block in blocks if "AsyncOpenAI" in block)
    assert "asyncio.run(main())" in snippet
    async with stack(tmp_path) as running:
        code = snippet.replace("https://llm.example.com/v1", f"{running.sidecar.http}/v1")
        code = code.replace("sk-your-litellm-virtual-key", USER_KEY).replace("asyncio.run(main())", "")
        namespace: dict[str, Any] = {}
        exec(compile(code, str(QUICKSTART), "exec"), namespace)
        await asyncio.wait_for(namespace["main"](), timeout=30)
    printed = capsys.readouterr().out.split()
    assert printed[:2] == ["session.created", "session.updated"]
    assert printed[-1] == "conversation.item.input_audio_transcription.completed"
