"""Stream a WAV file (24 kHz mono PCM16) through the sidecar with the official openai SDK.

    .venv/bin/python examples/transcribe.py examples/audio/speech_24k_pcm16.wav

Environment: SIDECAR_URL (default http://127.0.0.1:8787/v1), SIDECAR_KEY (default the example master
key), SIDECAR_MODEL (default gpt-realtime-whisper).
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import wave

from openai import AsyncOpenAI

CHUNK_MS = 100


async def transcribe(path: str) -> None:
    """Send the file in 100 ms chunks, commit, and print deltas and the final transcript."""
    client = AsyncOpenAI(
        base_url=os.environ.get("SIDECAR_URL", "http://127.0.0.1:8787/v1"),
        api_key=os.environ.get("SIDECAR_KEY", "sk-sidecar-master-example"),
    )
    model = os.environ.get("SIDECAR_MODEL", "gpt-realtime-whisper")
    with wave.open(path, "rb") as wav:
        if (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) != (24000, 2, 1):
            sys.exit("need a 24 kHz, 16-bit, mono WAV file")
        audio = wav.readframes(wav.getnframes())
    step = 24000 * 2 * CHUNK_MS // 1000
    async with client.realtime.connect(model=model, extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(
            session={
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}},
            }
        )
        for start in range(0, len(audio), step):
            await conn.input_audio_buffer.append(audio=base64.b64encode(audio[start : start + step]).decode())
        await conn.input_audio_buffer.commit()
        async for event in conn:
            if event.type == "conversation.item.input_audio_transcription.delta":
                print(event.delta, end="", flush=True)
            elif event.type == "conversation.item.input_audio_transcription.completed":
                print(f"\n\ntranscript: {event.transcript}")
                break
            elif event.type == "error":
                sys.exit(f"error: {event.error.code}: {event.error.message}")


if __name__ == "__main__":
    asyncio.run(transcribe(sys.argv[1] if len(sys.argv) > 1 else "examples/audio/speech_24k_pcm16.wav"))
