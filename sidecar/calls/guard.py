"""SettingsGuard: what a WebRTC call's browser changes over its data channel, seen on the sideband and kept
billable and pinned (docs/api.md, "WebRTC calls: watching, control and billing", "Settings changed on the call").

On a call the browser talks to the provider directly: its `session.update` never passes through the sidecar.
The provider's answer does: every `session.updated` (and a sideband's opening `session.created`) reaches the
call's sideband with the whole session as the provider now holds it. The watch feeds each such event to this
guard, which keeps the call's core in step and says what to do:

- the model (a conversation call's `model`, a transcription call's `audio.input.transcription.model`): the first
  value shown is the call's; another one later -> `Hangup("model_mismatch")` (the call is priced at its model);
- a conversation call's input transcription model (`audio.input.transcription.model`, beta
  `input_audio_transcription.model`), the provider's name for it mapped back to a configured transcriber: the
  core prices the transcription usage at that transcriber from then on; a name the sidecar cannot price (no
  configured transcriber on this provider) -> the core prices nothing more (`transcription_unpriced`) and
  `Hangup("transcriber_refused")`; one the key may not use -> priced at its own price, `Hangup("transcriber_refused")`;
- a client secret's bound settings (pinning.py), at their GA paths: the values the provider showed for them in the
  call's first session event are the call's; a session event showing another one -> `Restore` (a `session.update`
  with the bound values, for the sideband); a session event still showing another one after that, an `error`
  answering the restore, or a change after MAX_RESTORES restores -> `Hangup("session_pinned")`.

Pure: no I/O, no clock. Only session events (and, while a restore is pending, errors) are parsed: the watch calls
`on_text` for every sideband frame of a call, never on the WebSocket path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sidecar import protocol
from sidecar.auth import may_use
from sidecar.catalog import Transcriber
from sidecar.pinning import Path, settings
from sidecar.session import Session

MODEL: Final[Path] = ("model",)
TRANSCRIBER: Final[Path] = ("audio", "input", "transcription", "model")
#: Restores one call may need: a pinned setting changed once more after that many hangs the call up (a browser
#: that keeps changing it would otherwise have it in force between each change and its restore).
MAX_RESTORES: Final = 3
# Cheap checks on the raw text before parsing (they cover transcription_session.created/updated too).
_CREATED, _UPDATED, _ERROR = "session.created", "session.updated", '"error"'
_BETA_TRANSCRIPTION: Final = "input_audio_transcription"


@dataclass(frozen=True, slots=True)
class Restore:
    """Send `frame` (a `session.update` setting the bound values back) on the call's sideband."""

    frame: str
    event_id: str
    #: The first bound setting shown changed (dotted GA path), for the log.
    setting: str


@dataclass(frozen=True, slots=True)
class Hangup:
    """End the call with the ending `code` (errors._ENDINGS)."""

    code: str
    #: What was seen (a model name, a dotted setting path), for the log: never shown to a client.
    detail: str


Verdict = Restore | Hangup | None


class SettingsGuard:
    """Follows one realtime call's session as the provider shows it on the sideband."""

    def __init__(
        self,
        core: Session,
        *,
        transcribers: Mapping[str, Transcriber],
        bound: Mapping[str, Any] | None = None,
    ) -> None:
        """`core`: the call's /v1/realtime core (its transcriber is kept in step); `transcribers`: the catalog's;
        `bound`: the call's client secret's bound settings (Grant.session), None when it has none."""
        self._core = core
        self._transcribers = transcribers
        self._model_path = TRANSCRIBER if core.transcription else MODEL
        self._model: Any = None
        leaves = [path for path, _ in settings(bound)] if bound else []
        #: The bound settings checked (the model is the model rule's).
        self._pinned: tuple[Path, ...] = tuple(p for p in leaves if p not in (MODEL, self._model_path))
        self._bound = dict(bound) if bound else {}
        #: The values the call's first session event showed at each pinned path (None before it).
        self._baseline: dict[Path, list[tuple[Path, Any]]] | None = None
        #: The event id of the restore sent and not yet answered.
        self.restoring: str | None = None
        #: Restores sent on this call.
        self.restores = 0

    def reattached(self) -> None:
        """A new sideband replaces one that dropped: a restore sent on the old one may have been lost with it, so
        the new sideband's `session.created` starts a new restore (counted) rather than hanging up."""
        self.restoring = None

    def on_text(self, text: str) -> Verdict:
        """The verdict for one sideband frame (None for almost every frame, unparsed). Never raises."""
        if not (_UPDATED in text or _CREATED in text or (self.restoring is not None and _ERROR in text)):
            return None
        try:
            event = protocol.loads(text)
        except protocol.JSONDecodeError:
            return None
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "error":
            return self._on_error(event)
        session = event.get("session") if kind in protocol.SERVER_SESSION_EVENTS else None
        return self.on_session(session) if isinstance(session, dict) else None

    def on_session(self, session: Mapping[str, Any]) -> Verdict:
        """The verdict for the session a session event shows (the model, then the transcriber, then the pins)."""
        view = dict(settings(session))
        return self._model_rule(view) or self._transcriber_rule(view) or self._pin_rule(view)

    # ---- the rules ---------------------------------------------------------------------------------------

    def _model_rule(self, view: Mapping[Path, Any]) -> Hangup | None:
        shown = view.get(self._model_path)
        if not isinstance(shown, str):
            return None
        if self._model is None:
            self._model = shown  # the provider's spelling of the call's model (Azure: its deployment)
        elif shown != self._model:
            return Hangup("model_mismatch", shown)
        return None

    def _transcriber_rule(self, view: Mapping[Path, Any]) -> Hangup | None:
        if self._core.transcription:
            return None
        shown = view.get(TRANSCRIBER)
        if not isinstance(shown, str):
            return None  # no input transcription: no usage to price
        found = self._transcriber(shown)
        self._core.transcriber = found  # None: what arrives now is recorded unpriced, never at another's price
        if found is None or not may_use(self._core.principal, found.name):
            return Hangup("transcriber_refused", shown)
        return None

    def _transcriber(self, upstream: str) -> Transcriber | None:
        """The configured transcriber the provider calls `upstream` (the current one, then the one of that
        public name, then the first in config order)."""
        deployment = self._core.deployment
        named = [t for t in self._transcribers.values() if t.upstream_name(deployment) == upstream]
        for preferred in (self._core.transcriber, self._transcribers.get(upstream)):
            if preferred is not None and preferred in named:
                return preferred
        allowed = [t for t in named if may_use(self._core.principal, t.name)]
        first = allowed or named
        return first[0] if first else None

    def _pin_rule(self, view: Mapping[Path, Any]) -> Verdict:
        if not self._pinned:
            return None
        shown = {path: _under(view, path) for path in self._pinned}
        if self._baseline is None:
            self._baseline = shown
            return None
        changed = [path for path in self._pinned if shown[path] != self._baseline[path]]
        if not changed:
            self.restoring = None
            return None
        setting = ".".join(changed[0])
        if self.restoring is not None or self.restores >= MAX_RESTORES:
            return Hangup("session_pinned", setting)
        self.restores += 1
        self.restoring = protocol.event_id()
        return Restore(self._restore_frame(self.restoring), self.restoring, setting)

    def _on_error(self, event: Mapping[str, Any]) -> Hangup | None:
        if self.restoring is not None and protocol.dig(event, "error", "event_id") == self.restoring:
            return Hangup("session_pinned", "restore refused")
        return None

    def _restore_frame(self, event_id: str) -> str:
        """The `session.update` with the bound values, the model names as the provider knows them."""
        session = {key: value for key, value in self._bound.items() if key != "model"}
        session["type"] = "transcription" if self._core.transcription else "realtime"
        session = protocol.loads(protocol.dumps(session))  # a copy: the bound settings stay as bound
        for holder in (protocol.dig(session, "audio", "input", "transcription"), session.get(_BETA_TRANSCRIPTION)):
            if not isinstance(holder, dict) or not isinstance(name := holder.get("model"), str):
                continue
            if self._core.transcription:
                holder.pop("model")  # the model rule's: never re-sent
            else:
                known = self._transcribers.get(name)
                holder["model"] = (known.upstream_name(self._core.deployment) if known else None) or name
        return protocol.dumps({"type": protocol.SESSION_UPDATE, "event_id": event_id, "session": session})


def _under(view: Mapping[Path, Any], path: Path) -> list[tuple[Path, Any]]:
    """The leaves shown at `path`: under it, or above it (a non-object where the bound value is an object)."""
    return sorted(
        ((p, v) for p, v in view.items() if p[: len(path)] == path or path[: len(p)] == p),
        key=lambda item: item[0],
    )
