"""The calls comparison of `make bench-calls` (issue 17): its report (pure), its rounds' order, the calls
provider (bench/callprovider.py): its frames, its pushed events as the SDK types them, and on a real socket a
call created, its sideband pushed to on schedule and closed by the hangup; and the calls rounds end to end
through a real `sidecar serve` (about 30 s; no timing asserted)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from openai.types.realtime import ConversationItemInputAudioTranscriptionCompletedEvent, ResponseDoneEvent
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK

from bench import report
from bench.callprovider import OP_CLOSE, OP_PING, OP_TEXT, accept_key, client_frames, frame, pushed_event
from bench.run import calls_order

KEY = "sk-bench-calls-test"
REPO = Path(__file__).resolve().parents[1]


# ---- the report ------------------------------------------------------------------------------------


def _row(surface: str, *, open_ms: float, per_event: float, kb: float, errors: int = 0) -> dict[str, Any]:
    relay: dict[str, Any] = {"kb_per_session": kb}
    row: dict[str, Any] = {
        "calls_surface": surface,
        "sessions": 1000,
        "errors": errors,
        "setup_ms": {"p99": 5.0},
        "open_cpu_ms_per_session": open_ms,
        "relay": relay,
    }
    if surface == "calls":  # per event the provider pushed; a session's per reply its client got
        row |= {"cpu_us_per_pushed_event": per_event, "kernel_us_per_pushed_event": per_event / 4}
        row["provider_stats"] = {"events_in_window": 200_000}
    else:
        relay |= {"cpu_us_per_chunk_reply": per_event, "kernel_us_per_chunk_reply": per_event / 2}
        row["replies_in_window"] = 199_000
    return row


def test_a_call_is_judged_against_the_like_for_like_sessions_by_the_medians_of_its_rounds() -> None:
    rows = [
        *(_row("realtime", open_ms=2.0, per_event=e, kb=45.0) for e in (60.0, 70.0, 65.0)),
        *(_row("push", open_ms=o, per_event=50.0, kb=40.0) for o in (2.0, 3.0, 2.5)),
        *(_row("calls", open_ms=o, per_event=30.0, kb=30.0) for o in (2.6, 2.7, 2.75)),  # 2.7 / 2.5 = 1.08x
    ]
    block = report.calls(rows, rounds=3)
    assert block is not None and block["base"] == "push"
    realtime, push, calls = block["summary"]
    assert push["open_cpu_ms"] == {"median": 2.5, "min": 2.0, "max": 3.0, "n": 3}
    assert realtime["cpu_us_per_event"]["median"] == 65.0 and realtime["cpu_us_per_event_ratio"] == 1.3
    assert "pass" not in realtime and "pass" not in push
    assert (calls["open_cpu_ms_ratio"], calls["cpu_us_per_event_ratio"], calls["kb_per_session_ratio"]) == (
        1.08,
        0.6,
        0.75,
    )
    assert calls["events_in_window"]["median"] == 200_000 and push["events_in_window"]["median"] == 199_000
    assert calls["pass"] is True
    assert "| 1000 | WebRTC calls (sideband) | 3 |" in report.calls_table({"calls": block})


def test_a_call_fails_on_any_figure_over_ten_percent_or_on_an_error() -> None:
    base = [_row("push", open_ms=2.0, per_event=50.0, kb=40.0)]
    dear_open = report.calls([*base, _row("calls", open_ms=2.3, per_event=40.0, kb=30.0)], rounds=1)
    dear_event = report.calls([*base, _row("calls", open_ms=2.0, per_event=56.0, kb=30.0)], rounds=1)
    errors = report.calls([*base, _row("calls", open_ms=2.0, per_event=40.0, kb=30.0, errors=1)], rounds=1)
    no_base = report.calls([_row("calls", open_ms=2.0, per_event=40.0, kb=30.0)], rounds=1)
    assert dear_open is not None and dear_open["summary"][1]["pass"] is False
    assert dear_event is not None and dear_event["summary"][1]["pass"] is False
    assert errors is not None and errors["summary"][1]["pass"] is False
    assert no_base is not None and no_base["summary"][0]["pass"] is None
    assert report.calls([], rounds=3) is None


def test_the_levels_are_reported_apart() -> None:
    rows = [_row("push", open_ms=2.0, per_event=50.0, kb=40.0), _row("calls", open_ms=2.0, per_event=40.0, kb=30.0)]
    half = [r | {"sessions": 500} for r in rows]
    block = report.calls([*rows, *half], rounds=1)
    assert block is not None
    assert [(s["sessions"], s["surface"]) for s in block["summary"]] == [
        (500, "push"),
        (500, "calls"),
        (1000, "push"),
        (1000, "calls"),
    ]


def test_calls_rounds_rotate_the_order() -> None:
    assert calls_order(4) == [
        ["realtime", "push", "calls"],
        ["push", "calls", "realtime"],
        ["calls", "realtime", "push"],
        ["realtime", "push", "calls"],
    ]


# ---- the provider, pure ------------------------------------------------------------------------------


def test_accept_key_is_rfc_6455s() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_client_frames_are_unmasked_and_consumed_whole_only() -> None:
    mask = b"\x01\x02\x03\x04"
    payload = b"\x03\xe8bye"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    buffer = bytearray(b"\x88" + bytes([0x80 | len(payload)]) + mask + masked + b"\x89\x80" + mask + b"\x81")
    assert client_frames(buffer) == [(OP_CLOSE, payload), (OP_PING, b"")]
    assert buffer == bytearray(b"\x81")  # an incomplete frame stays
    long = bytes(300)
    assert frame(OP_TEXT, long)[:4] == b"\x81\x7e\x01\x2c" and frame(OP_TEXT, b"hi") == b"\x81\x02hi"


def test_pushed_events_alternate_and_are_what_the_sdk_reads() -> None:
    done = ResponseDoneEvent.model_validate(orjson.loads(pushed_event(0)))
    completed = ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(orjson.loads(pushed_event(1)))
    again = ResponseDoneEvent.model_validate(orjson.loads(pushed_event(2)))
    assert done.response.usage is not None and done.response.usage.total_tokens
    assert completed.usage.type == "duration"
    assert done.response.id != again.response.id and done.event_id != again.event_id


# ---- the provider on a real socket ---------------------------------------------------------------------


async def test_a_call_is_created_pushed_to_on_schedule_and_its_sideband_closed_by_the_hangup() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.callprovider",
        "--api-key",
        KEY,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert process.stdout is not None
        base = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        http = base.replace("ws://", "http://")
        auth = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(timeout=10) as client:
            refused = await client.post(f"{http}/v1/realtime/calls", content=b"v=0")
            created = await client.post(f"{http}/v1/realtime/calls", content=b"v=0", headers=auth)
            assert refused.status_code == 401
            assert created.status_code == 201 and created.text.startswith("v=0")
            call_id = created.headers["location"].rsplit("/", 1)[1]
            unknown = f"{base}/v1/realtime?call_id=rtc_none"
            async with connect(f"{base}/v1/realtime?call_id={call_id}", additional_headers=auth) as sideband:
                assert orjson.loads(await sideband.recv())["type"] == "session.created"
                now = time.monotonic()  # the provider's clock (CLOCK_MONOTONIC is the machine's)
                await client.post(f"{http}/bench/schedule", json={"from": now, "until": now + 3600, "every_s": 0.01})
                kinds = [orjson.loads(await sideband.recv())["type"] for _ in range(4)]
                assert kinds == ["response.done", "conversation.item.input_audio_transcription.completed"] * 2
                assert (
                    await client.post(f"{http}/v1/realtime/calls/{call_id}/hangup", headers=auth)
                ).status_code == 200
                try:
                    while True:
                        await sideband.recv()
                except ConnectionClosedOK as closed:
                    assert closed.rcvd is not None and closed.rcvd.code == 1000
            gone = await client.post(f"{http}/v1/realtime/calls/{call_id}/hangup", headers=auth)
            stats = (await client.post(f"{http}/bench/stats")).json()
        assert gone.status_code == 404
        assert stats["created"] == 1 and stats["hangups"] == 1 and stats["events"] >= 4
        try:
            async with connect(unknown, additional_headers=auth):
                raise AssertionError("an unknown call's sideband was accepted")
        except Exception as exc:  # the upgrade is refused with 404
            assert "404" in str(exc)
    finally:
        process.terminate()
        await process.wait()


# ---- `make bench-calls` in miniature ----------------------------------------------------------------------


def test_the_calls_rounds_run_end_to_end_through_a_real_sidecar(tmp_path: Path) -> None:
    """`bench.run --calls-only` at 5 sessions, one round: every call is created, watched, pushed to, hung up and
    let go; every surface has its figures (no timing asserted)."""
    command = [sys.executable, "-m", "bench.run", "--calls-only", "--calls-levels", "5", "--calls-rounds", "1"]
    command += ["--duration", "2", "--out", str(tmp_path)]
    with subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            stdout, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # it stops its own subprocesses
            stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout[-2000:]
    document = json.loads((tmp_path / "latest.json").read_text())
    assert document["results"] == [] and document["options"]["calls_only"] is True
    runs = {r["calls_surface"]: r for r in document["calls"]["runs"]}
    assert sorted(runs) == ["calls", "push", "realtime"]
    for surface, row in runs.items():
        assert row["errors"] == 0, (surface, row["error_detail"])
        assert row["connected"] == 5 and row["relay"]["released_all_sessions"] is True
        assert row["open_cpu_ms_per_session"] is not None
    calls, push = runs["calls"], runs["push"]
    assert calls["provider_stats"]["created"] == calls["provider_stats"]["hangups"] == 5
    assert calls["close_codes"] == {"hangup_200": 5}
    assert calls["provider_stats"]["events_in_window"] > 0 and calls["cpu_us_per_pushed_event"] is not None
    assert push["replies_in_window"] > 0 and push["relay"]["cpu_us_per_chunk_reply"] is not None
    assert "| 5 | WebRTC calls (sideband) | 1 |" in stdout
