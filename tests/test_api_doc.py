"""docs/api.md is the interface's one source of truth: whatever the code exposes is written there.

Each test reads the names from the code itself (the routes of a built app, the refusal classes, the endings
table, the error events the session core can send, the CLI parser), so a new one that is not documented fails
here. Settings are checked by tests/test_docs.py against the same page.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import sidecar
from sidecar import cli, errors
from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.errors import Refusal

ROOT = Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text("utf-8")
# An error event's code: the first argument of an error_event function or a core's `error` method, or the
# code a session check returns.
ERROR_EVENT_CODE = re.compile(r'(?:error(?:_event)?\(|return \(?)\s*"([a-z]+_[a-z0-9_]+)",')


def documented(name: str) -> bool:
    """`name` appears in docs/api.md as code (in backticks), alone or as the start of a longer span."""
    return re.search(rf"`{re.escape(name)}[`\s\[{{?]", API) is not None


def refusals() -> set[type[Refusal]]:
    """Every Refusal subclass the sidecar package defines (all of its modules imported first)."""
    for module in pkgutil.walk_packages(sidecar.__path__, "sidecar."):
        if not module.name.startswith(("sidecar.testing", "sidecar.billing")):
            importlib.import_module(module.name)
    found: set[type[Refusal]] = set()
    todo = [Refusal]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.add(sub)
            todo.append(sub)
    return found


def test_every_refusal_is_documented_with_its_status_and_code() -> None:
    """Each refusal class's status and code stand together on one row of docs/api.md."""
    missing = []
    for refusal in refusals():
        row = re.search(rf"^\|[^\n]*\b{refusal.status}\b[^\n]*`{refusal.code}`", API, re.MULTILINE)
        if row is None and not (documented(refusal.code) and str(refusal.status) in API):
            missing.append(f"{refusal.status} {refusal.code} ({refusal.__module__}.{refusal.__name__})")
    assert missing == []


def test_every_ending_is_documented_with_its_close_code() -> None:
    """Each ending of the session (close code, error code) is a row of the close-code table."""
    for code, (close_code, _, _) in errors._ENDINGS.items():
        assert re.search(rf"^\| {close_code} \| `{code}` \|", API, re.MULTILINE), code


def test_every_error_event_code_is_documented() -> None:
    """Every code the relay or the session core can put in an error event is named in docs/api.md."""
    codes = set()
    for path in (ROOT / "sidecar").rglob("*.py"):  # sub-packages too (the surfaces' cores)
        if "testing" not in path.relative_to(ROOT / "sidecar").parts:  # the fake provider's codes are its own
            codes |= set(ERROR_EVENT_CODE.findall(path.read_text("utf-8")))
    codes -= {"openai", "azure"}  # provider names returned by catalog helpers, not codes
    assert {"invalid_json", "invalid_base64", "model_mismatch", "binary_not_supported"} <= codes  # the scan works
    assert {"unknown_event", "session_already_started"} <= codes  # and reaches sidecar/surfaces
    assert sorted(code for code in codes if not documented(code)) == []


def test_every_route_is_documented(tmp_path: Path) -> None:
    """Every HTTP and WebSocket route of the app (admin and captions included) is in docs/api.md."""
    settings = Settings(litellm_config=tmp_path / "unused.yaml", captions_page=True, captions_key="sk-captions")
    app = create_app(settings)
    paths = {route.path for route in app.routes}  # type: ignore[attr-defined]
    assert {"/v1/realtime", "/admin/sessions", "/admin/revocations", "/captions/token"} <= paths
    assert (
        sorted(path for path in paths if f"`{path}" not in API and f" {path}`" not in API and f", `{path}" not in API)
        == []
    )


def test_every_cli_command_is_documented() -> None:
    """Every `sidecar` subcommand (and `db upgrade`) has a row in the CLI table."""
    parser = cli.parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    assert commands is not None
    for name, sub in commands.items():
        nested = [a for a in sub._actions if a.choices and a.dest != "help"]
        names = [f"{name} {inner}" for action in nested for inner in action.choices] or [name]  # type: ignore[union-attr]
        for full in names:
            assert f"`sidecar {full}" in API, full
