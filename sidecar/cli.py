"""The `sidecar` command: serve, consume, models, smoke, db upgrade (docs/api.md, "The CLI")."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from sidecar.config import Settings
from sidecar.errors import ConfigError, SidecarError


def _settings(*, require_config: bool = True) -> Settings:
    return Settings.from_env(os.environ, require_config=require_config)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the relay under uvicorn (on uvloop); the first SIGTERM drains (sessions get their grace, then 1001)."""
    from sidecar.server import serve_workers
    from sidecar.tuning import use_system_malloc

    settings = _settings()
    host, port = args.host or settings.host, args.port or settings.port
    workers = args.workers or settings.workers
    check_workers(settings, workers)
    use_system_malloc()  # no-op when PYTHONMALLOC is set (the re-executed process has it)

    def build() -> tuple[Any, Any, float]:
        from sidecar.app import create_app
        from sidecar.logs import configure_logging
        from sidecar.server import config_for

        configure_logging()
        app = create_app(settings)
        return (
            app,
            config_for(
                app,
                host=host,
                port=port,
                max_frame_bytes=settings.max_frame_bytes,
                handshake_timeout_s=settings.handshake_timeout_s,
                max_connections=settings.max_connections,
            ),
            settings.drain_grace_s,
        )

    return serve_workers(build, host=host, port=port, workers=workers)


def check_workers(settings: Settings, workers: int) -> None:
    """Raise ConfigError for several workers in embedded mode.

    Without Redis each process keeps its own client-secret claims, concurrency leases and budgets, so N
    workers would let a single-use secret work N times and a key hold N times its session limit.
    """
    if workers > 1 and not settings.redis_url:
        raise ConfigError(
            f"{workers} workers need SIDECAR_REDIS_URL: embedded mode keeps client-secret claims, "
            "session limits and budgets per process (use --workers 1, or set SIDECAR_REDIS_URL)"
        )


def cmd_models(args: argparse.Namespace) -> int:
    """Print the realtime models, their kind, unit and price."""
    from sidecar.catalog import describe, format_table, load_catalog

    settings = _settings()
    catalog = load_catalog(
        settings.litellm_config,
        environ=dict(os.environ),
        default_transcription_model=settings.default_transcription_model,
    )
    rows = describe(catalog)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Create the billing tables if they are missing."""
    from sidecar.billing.writer import make_engine, upgrade

    settings = _settings(require_config=False)
    engine = make_engine(settings.database_url, timeout_s=settings.db_timeout_s)
    upgrade(engine)
    print("billing tables ready")
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    """Read the usage stream into the billing DB until SIGINT/SIGTERM."""
    import redis.asyncio as aioredis

    from sidecar.billing.consumer import UsageConsumer
    from sidecar.billing.writer import BillingWriter, make_engine, upgrade
    from sidecar.logs import configure_logging

    settings = _settings(require_config=False)
    configure_logging()
    if not settings.redis_url:
        print("sidecar consume needs SIDECAR_REDIS_URL (embedded mode bills in-process)", file=sys.stderr)
        return 2
    engine = make_engine(settings.database_url, timeout_s=settings.db_timeout_s)
    upgrade(engine)

    async def run() -> None:
        # Bounded waits on Redis too (XREADGROUP blocks 1 s, well inside the socket timeout).
        redis = aioredis.Redis.from_url(
            settings.redis_url or "", socket_timeout=10, socket_connect_timeout=5, socket_keepalive=True
        )
        writer = BillingWriter(engine, timeout_s=settings.db_timeout_s)
        consumer = UsageConsumer(redis, writer, stream=settings.usage_stream, lost_after_s=settings.lost_after_s)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await consumer.run(stop)
        finally:
            await redis.aclose()

    asyncio.run(run())
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    """Open an upstream session for MODEL's deployments and wait for the first server event."""
    from sidecar.smoke import run_smoke

    code: int = asyncio.run(run_smoke(_settings(), args.model, timeout_s=args.timeout))
    return code


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(prog="sidecar", description="Realtime sidecar for the LiteLLM proxy")
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="worker processes sharing the port (default SIDECAR_WORKERS, 1)")
    serve.set_defaults(func=cmd_serve)
    consume = sub.add_parser("consume", help="write the usage stream to the billing DB")
    consume.set_defaults(func=cmd_consume)
    models = sub.add_parser("models", help="list the realtime models")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)
    smoke = sub.add_parser("smoke", help="check a model's upstream deployments")
    smoke.add_argument("model")
    smoke.add_argument("--timeout", type=float, default=10.0)
    smoke.set_defaults(func=cmd_smoke)
    db = sub.add_parser("db", help="billing database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="create the billing tables").set_defaults(func=cmd_db_upgrade)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `sidecar` console script."""
    args = parser().parse_args(argv)
    try:
        code = args.func(args)
    except SidecarError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()
