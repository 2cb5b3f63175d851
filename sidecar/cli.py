"""The `sidecar` command: serve, consume, models, smoke, db upgrade, ledger status (docs/api.md, "The CLI").

Misconfiguration (a missing or malformed setting, an unreadable or invalid LiteLLM config, an unpriced
realtime model, a port already in use) is found before anything is served and reported as one line on stderr
with exit status 2; warnings (each naming its config entry) come only once the command has passed its checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, NoReturn

from sidecar.config import Settings
from sidecar.errors import ConfigError, SidecarError

if TYPE_CHECKING:
    from sidecar.billing.metrics import ConsumeMetrics
    from sidecar.catalog import Catalog
    from sidecar.model_source import ModelSource

log = logging.getLogger("sidecar.cli")

# What each command reads, for its --help (docs/api.md, "Settings", has every variable).
_CONFIG_VARS = (
    "SIDECAR_LITELLM_CONFIG (required), SIDECAR_DEFAULT_TRANSCRIPTION_MODEL, LITELLM_MASTER_KEY, "
    "the os.environ/ variables the config names"
)
_EPILOGS = {
    "serve": (
        "reads every SIDECAR_* setting (docs/api.md, Settings), notably: "
        + _CONFIG_VARS
        + "; SIDECAR_LITELLM_URL, SIDECAR_REDIS_URL or SIDECAR_REDIS_SENTINEL_NODES or SIDECAR_REDIS_CLUSTER_NODES "
        "(unset: embedded mode), SIDECAR_DATABASE_URL (embedded mode), "
        "SIDECAR_HOST, SIDECAR_PORT, SIDECAR_WORKERS, SIDECAR_ALLOW_UNPRICED, PYTHONMALLOC. "
        "Exit status: 0 after a drain, 2 on misconfiguration."
    ),
    "consume": (
        "reads SIDECAR_REDIS_URL, _SENTINEL_NODES or _CLUSTER_NODES (one required), SIDECAR_DATABASE_URL, "
        "SIDECAR_DB_TIMEOUT_S, SIDECAR_LOST_AFTER_S, "
        "SIDECAR_LITELLM_DATABASE_URL (set: the litellm group runs too), SIDECAR_LITELLM_REDIS_URL, "
        "SIDECAR_LITELLM_REDIS_NAMESPACE, SIDECAR_CONSUME_METRICS_PORT, SIDECAR_HOST; not the LiteLLM config. "
        "Retries Redis and the databases until they answer. "
        "Exit status: 0 on SIGINT/SIGTERM, 1 when a group's consumer failed, 2 on misconfiguration."
    ),
    "status": (
        "reads SIDECAR_REDIS_URL, _SENTINEL_NODES or _CLUSTER_NODES (one required), "
        "SIDECAR_LITELLM_DATABASE_URL (set: the LiteLLM ledger is shown), "
        "SIDECAR_DB_TIMEOUT_S. Exit status: 0; 1 when Redis or LiteLLM's database cannot be read; "
        "2 on misconfiguration."
    ),
    "models": "reads " + _CONFIG_VARS + ". Exit status: 0, 2 on misconfiguration.",
    "smoke": (
        "reads " + _CONFIG_VARS + ", and the provider keys of MODEL's deployments. "
        "Exit status: 0 when every deployment answers, 1 otherwise, 2 on misconfiguration."
    ),
    "upgrade": (
        "reads SIDECAR_DATABASE_URL, SIDECAR_DB_TIMEOUT_S; not the LiteLLM config. "
        "Exit status: 0, 2 on misconfiguration or an unreachable database."
    ),
}


def _settings(*, require_config: bool = True) -> Settings:
    return Settings.from_env(os.environ, require_config=require_config)


def _catalog(settings: Settings) -> tuple[ModelSource, Catalog]:
    """config.yaml's models and, with SIDECAR_LITELLM_DATABASE_URL, LiteLLM's DB-stored ones (merged as the proxy
    merges them), priced as the proxy prices them (sidecar/model_source.py). Raises ConfigError, or
    ProxyModelsUnavailable when that database cannot be read."""
    from sidecar.model_source import ModelSource

    source = ModelSource(settings, environ=dict(os.environ))
    return source, source.load_with_prices()


def check_prices(catalog: Catalog, *, allow_unpriced: bool) -> None:
    """Raise ConfigError when a realtime model has no price and SIDECAR_ALLOW_UNPRICED is off: its sessions
    would be billed $0 without anyone noticing."""
    unpriced = catalog.unpriced()
    if unpriced and not allow_unpriced:
        raise ConfigError(
            f"realtime model {', '.join(unpriced)} has no price (its sessions would bill $0): price it in "
            "model_info (input_cost_per_second, input_cost_per_minute or token prices), or set "
            "SIDECAR_ALLOW_UNPRICED=1 to serve it free"
        )


def check_spool(settings: Settings) -> None:
    """Raise ConfigError when SIDECAR_SPOOL_DIR cannot be created or written (usage would have nowhere to wait)."""
    directory = settings.spool_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"SIDECAR_SPOOL_DIR {directory} cannot be created: {exc.strerror or type(exc).__name__}"
        ) from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"SIDECAR_SPOOL_DIR {directory} is not writable")


def startup_warnings(settings: Settings, catalog: Catalog) -> list[str]:
    """The catalog's warnings, a LiteLLM URL with no master key to ask it with, and Azure's preview URL form."""
    found = list(catalog.warnings)
    if settings.litellm_url and catalog.master_key is None:
        found.append(
            "SIDECAR_LITELLM_URL is set but there is no master key (general_settings.master_key or "
            "LITELLM_MASTER_KEY): client secrets and live-key re-checks cannot be checked"
        )
    from sidecar.catalog import ROUTES
    from sidecar.upstream import preview_warning

    deployments = [d for route in ROUTES for m in catalog.served(route).values() for d in m.deployments]
    if (preview := preview_warning(deployments)) is not None:
        found.append(preview)
    return found


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the relay under uvicorn (on uvloop); the first SIGTERM drains (sessions get their grace, then 1001)."""
    from sidecar.logs import configure_logging
    from sidecar.server import bind, serve_workers
    from sidecar.tuning import use_system_malloc

    use_system_malloc()  # first: it re-executes this process (no-op when PYTHONMALLOC is set)
    settings = _settings()
    host, port = args.host or settings.host, args.port or settings.port
    workers = settings.workers if args.workers is None else args.workers
    check_workers(settings, workers)
    source, catalog = _catalog(settings)
    check_prices(catalog, allow_unpriced=settings.allow_unpriced)
    check_spool(settings)
    if not settings.redis_enabled:  # embedded mode bills into the database: it must be one this process can use
        from sidecar.billing.writer import make_engine, upgrade

        engine = make_engine(settings.database_url, timeout_s=settings.db_timeout_s)
        upgrade(engine)  # BillingDatabaseError: e.g. a SQLite file in a directory that does not exist
        engine.dispose()
    sock = bind(host, port)
    configure_logging()
    for warning in startup_warnings(settings, catalog):
        log.warning("config: %s", warning)
    log.info(
        "serving on %s:%d: %s mode, %d worker%s, %d realtime model%s",
        host,
        sock.getsockname()[1],
        f"Redis ({settings.redis_target.mode})" if settings.redis_target else "embedded",
        workers,
        "" if workers == 1 else "s",
        len(catalog.models),
        "" if len(catalog.models) == 1 else "s",
    )

    def build() -> tuple[Any, Any, float]:
        from sidecar.app import create_app
        from sidecar.server import config_for

        configure_logging()
        app = create_app(settings, catalog=catalog, model_source=source)
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

    return serve_workers(build, host=host, port=port, workers=workers, sock=sock)


def check_workers(settings: Settings, workers: int) -> None:
    """Raise ConfigError for several workers in embedded mode.

    Without Redis each process keeps its own client-secret claims, concurrency leases and budgets, so N
    workers would let a single-use secret work N times and a key hold N times its session limit.
    """
    if workers <= 0:
        raise ConfigError(f"--workers must be positive, got {workers}")
    if workers > 1 and not settings.redis_enabled:
        raise ConfigError(
            f"{workers} workers need SIDECAR_REDIS_URL (or SIDECAR_REDIS_SENTINEL_NODES, SIDECAR_REDIS_CLUSTER_NODES): "
            "embedded mode keeps client-secret claims, session limits and budgets per process (use --workers 1, "
            "or set SIDECAR_REDIS_URL)"
        )


def cmd_models(args: argparse.Namespace) -> int:
    """Print the realtime models, their kind, unit and price (warnings, each naming its entry, on stderr)."""
    from sidecar.catalog import describe, format_table
    from sidecar.proxy_prices import with_sources

    settings = _settings()
    source, catalog = _catalog(settings)
    for warning in catalog.warnings:
        print(f"sidecar: warning: {warning}", file=sys.stderr)
    rows = describe(catalog)
    print(json.dumps(with_sources(rows, source.sources), indent=2) if args.json else format_table(rows))
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Create the billing tables if they are missing."""
    from sidecar.billing.writer import make_engine, upgrade

    settings = _settings(require_config=False)
    engine = make_engine(settings.database_url, timeout_s=settings.db_timeout_s)
    upgrade(engine)
    print("billing tables ready")
    return 0


def consume_groups(sink: str | None, settings: Settings) -> tuple[str, ...]:
    """The consumer groups `sidecar consume [--sink S]` runs: `billing`, plus `litellm` when LiteLLM's database
    is set; or the one named. Raises ConfigError for `--sink litellm` without SIDECAR_LITELLM_DATABASE_URL."""
    if sink == "litellm" and not settings.litellm_database_url:
        raise ConfigError(
            "sidecar consume --sink litellm needs SIDECAR_LITELLM_DATABASE_URL (the LiteLLM proxy's DATABASE_URL)"
        )
    if settings.litellm_database_url:
        litellm_connect_params(settings)
    if sink is not None:
        return (sink,)
    return ("billing", "litellm") if settings.litellm_database_url else ("billing",)


def litellm_connect_params(settings: Settings) -> tuple[dict[str, Any], str]:
    """libpq parameters and schema for SIDECAR_LITELLM_DATABASE_URL. Raises ConfigError for one libpq cannot
    parse (an unknown query parameter), naming the problem, never the URL."""
    import psycopg

    from sidecar.ledger.sink import connect_params

    try:
        return connect_params(settings.litellm_database_url or "", timeout_s=settings.db_timeout_s)
    except psycopg.Error as exc:
        reason = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"SIDECAR_LITELLM_DATABASE_URL is not a PostgreSQL URL libpq takes: {reason}") from exc


def cmd_consume(args: argparse.Namespace) -> int:
    """Read the usage stream into the billing DB and/or LiteLLM's ledger until SIGINT/SIGTERM."""
    settings = _settings(require_config=False)
    if settings.redis_target is None:
        raise ConfigError(
            "sidecar consume needs SIDECAR_REDIS_URL, SIDECAR_REDIS_SENTINEL_NODES or SIDECAR_REDIS_CLUSTER_NODES"
            " (embedded mode bills in-process)"
        )
    groups = consume_groups(args.sink, settings)
    from sidecar.billing.metrics import ConsumeMetrics
    from sidecar.billing.writer import make_engine
    from sidecar.logs import configure_logging

    engine = make_engine(settings.database_url, timeout_s=settings.db_timeout_s) if "billing" in groups else None
    metrics = None
    if settings.consume_metrics_port:
        metrics = ConsumeMetrics()
        try:
            metrics.serve(host=settings.host, port=settings.consume_metrics_port)
        except OSError as exc:
            raise ConfigError(
                f"SIDECAR_CONSUME_METRICS_PORT: cannot listen on {settings.host}:{settings.consume_metrics_port}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from exc
    configure_logging()
    return asyncio.run(_consume(settings, groups, engine, metrics))


async def _consume(settings: Settings, groups: Sequence[str], engine: Any, metrics: ConsumeMetrics | None) -> int:
    """Run one consumer per group, each in its own task: one failing (a bug) is logged and the others go on."""
    from sidecar.billing.consumer import create_groups_when_reachable
    from sidecar.redis_conn import connect_redis

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Bounded waits on Redis too (XREADGROUP blocks 1 s, well inside the socket timeout).
    assert settings.redis_target is not None  # cmd_consume checked
    redis = connect_redis(settings.redis_target, socket_timeout=10, socket_connect_timeout=5, socket_keepalive=True)
    if not await create_groups_when_reachable(redis, settings.usage_stream, groups, stop):
        await redis.aclose()
        return 0
    runners = {"billing": lambda: _run_billing(settings, redis, engine, stop, metrics)}
    runners["litellm"] = lambda: _run_litellm(settings, redis, stop, metrics)
    tasks = {asyncio.create_task(runners[group](), name=f"consume-{group}"): group for group in groups}
    failed = 0
    try:
        for task in asyncio.as_completed(tasks):
            try:
                await task
            except Exception:
                failed += 1
                log.exception("a consumer group failed; the others go on")
    finally:
        await redis.aclose()
    return 1 if failed else 0


async def _run_billing(
    settings: Settings, redis: Any, engine: Any, stop: asyncio.Event, metrics: ConsumeMetrics | None
) -> None:
    from sidecar.billing.consumer import UsageConsumer, upgrade_when_reachable
    from sidecar.billing.writer import BillingWriter

    if not await upgrade_when_reachable(engine, stop):  # a database down at start is waited for, not fatal
        return
    writer = BillingWriter(engine, timeout_s=settings.db_timeout_s)
    consumer = UsageConsumer(
        redis, writer, stream=settings.usage_stream, lost_after_s=settings.lost_after_s, observer=metrics
    )
    await consumer.run(stop)


async def _run_litellm(settings: Settings, redis: Any, stop: asyncio.Event, metrics: ConsumeMetrics | None) -> None:
    """The litellm group: LiteLLM's ledger, then (after each commit, before the ack) the sidecar's budget settle
    and LiteLLM's cache invalidations on the proxy's Redis (SIDECAR_LITELLM_REDIS_URL; unset: none)."""
    from sidecar.billing.consumer import LITELLM_GROUP, UsageConsumer
    from sidecar.billing.writer import BillingError
    from sidecar.ledger.aftercommit import AfterCommit
    from sidecar.ledger.sink import LedgerSink
    from sidecar.redis_conn import RedisTarget, connect_redis

    proxy_redis = (
        connect_redis(RedisTarget(mode="single", url=settings.litellm_redis_url), socket_timeout=5)
        if settings.litellm_redis_url
        else None
    )
    after = AfterCommit(
        redis, prefix=settings.control_prefix, proxy_redis=proxy_redis, namespace=settings.litellm_redis_namespace
    )

    sink = LedgerSink(settings.litellm_database_url or "", timeout_s=settings.db_timeout_s, observer=metrics)
    consumer = UsageConsumer(
        redis,
        sink,
        stream=settings.usage_stream,
        group=LITELLM_GROUP,
        observer=metrics,
        after_commit=after.batch,
    )
    try:
        try:  # the sink's tables and schema probe at start, so a refusal shows before the first entry
            await asyncio.to_thread(sink.check)
        except BillingError as exc:  # the consumer retries it with each batch, the entries pending meanwhile
            log.warning("litellm: LiteLLM's database not ready at start: %s", exc)
        await consumer.run(stop)
    finally:
        await asyncio.to_thread(sink.close)
        if proxy_redis is not None:
            await proxy_redis.aclose()


def cmd_ledger_status(args: argparse.Namespace) -> int:
    """Print each consumer group's lag, pending and dead letters, and the LiteLLM sink's progress."""
    settings = _settings(require_config=False)
    if settings.redis_target is None:
        raise ConfigError(
            "sidecar ledger status needs SIDECAR_REDIS_URL, SIDECAR_REDIS_SENTINEL_NODES or SIDECAR_REDIS_CLUSTER_NODES"
            " (the usage stream)"
        )
    if settings.litellm_database_url:
        litellm_connect_params(settings)
    code: int = asyncio.run(_ledger_status(settings, as_json=args.json))
    return code


async def _ledger_status(settings: Settings, *, as_json: bool) -> int:
    import psycopg

    from sidecar.billing.consumer import GROUP, LITELLM_GROUP
    from sidecar.ledger.status import LedgerStatus, format_status, ledger_status, stream_status
    from sidecar.ledger.status import as_json as status_json
    from sidecar.redis_conn import REDIS_ERRORS, connect_redis

    errors: list[str] = []
    assert settings.redis_target is not None  # cmd_ledger_status checked
    redis = connect_redis(settings.redis_target, socket_timeout=10, socket_connect_timeout=5)
    try:
        now = datetime.now(UTC)
        groups = await stream_status(redis, settings.usage_stream, (GROUP, LITELLM_GROUP), now=now)
    except REDIS_ERRORS as exc:
        groups = []
        errors.append(f"Redis: {type(exc).__name__}: {exc}")
    finally:
        await redis.aclose()
    ledger: LedgerStatus | None = None
    if settings.litellm_database_url:
        try:
            params, namespace = litellm_connect_params(settings)

            def read() -> LedgerStatus:
                with psycopg.connect(autocommit=True, **params) as conn:
                    return ledger_status(conn, namespace=namespace)

            ledger = await asyncio.to_thread(read)
        except (psycopg.Error, OSError) as exc:
            errors.append(f"LiteLLM's database: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
    if as_json:
        print(json.dumps({**status_json(settings.usage_stream, groups, ledger), "errors": errors}, indent=2))
    else:
        print(format_status(settings.usage_stream, groups, ledger))
        for error in errors:
            print(f"sidecar: cannot read {error}", file=sys.stderr)
    return 1 if errors else 0


def cmd_smoke(args: argparse.Namespace) -> int:
    """Open an upstream session for MODEL's deployments and wait for the first server event."""
    from sidecar.smoke import run_smoke

    code: int = asyncio.run(run_smoke(_settings(), args.model, timeout_s=args.timeout))
    return code


def _version() -> str:
    try:
        return version("realtime-sidecar")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (`sidecar serve: argument --port: ...`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def _sink(text: str) -> str:
    if text not in ("billing", "litellm"):
        raise argparse.ArgumentTypeError(f"must be billing or litellm, got {text!r}")
    return text


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = _Parser(prog="sidecar", description="Realtime sidecar for the LiteLLM proxy")
    top.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay", description="Run the relay.", epilog=_EPILOGS["serve"])
    serve.add_argument("--host", help="address to listen on (default SIDECAR_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=_positive(int), help="port to listen on (default SIDECAR_PORT, 8787)")
    serve.add_argument(
        "--workers", type=_positive(int), help="worker processes sharing the port (default SIDECAR_WORKERS, 1)"
    )
    serve.set_defaults(func=cmd_serve)
    consume = sub.add_parser(
        "consume",
        help="write the usage stream to the billing DB and LiteLLM's ledger",
        description=(
            "Write the Redis usage stream into the billing database (group billing) and, when "
            "SIDECAR_LITELLM_DATABASE_URL is set, into LiteLLM's own ledger (group litellm), until SIGINT/SIGTERM."
        ),
        epilog=_EPILOGS["consume"],
    )
    consume.add_argument(
        "--sink",
        type=_sink,
        metavar="{billing,litellm}",
        help="run this consumer group alone (default: billing, plus litellm when SIDECAR_LITELLM_DATABASE_URL is set)",
    )
    consume.set_defaults(func=cmd_consume)
    models = sub.add_parser(
        "models",
        help="list the realtime models",
        description="List the realtime models of the LiteLLM config: kind, unit, price, deployments.",
        epilog=_EPILOGS["models"],
    )
    models.add_argument("--json", action="store_true", help="print JSON (the rows of GET /v1/realtime/models)")
    models.set_defaults(func=cmd_models)
    smoke = sub.add_parser(
        "smoke",
        help="check a model's upstream deployments",
        description="Open each deployment of MODEL, send 100 ms of silence, wait for the first server event.",
        epilog=_EPILOGS["smoke"],
    )
    smoke.add_argument("model", help="a public model name of the config")
    smoke.add_argument("--timeout", type=_positive(float), default=10.0, help="seconds per deployment (default 10)")
    smoke.set_defaults(func=cmd_smoke)
    db = sub.add_parser("db", help="billing database", description="Billing database commands.")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser(
        "upgrade",
        help="create the billing tables",
        description="Create the billing tables that are missing (safe to repeat).",
        epilog=_EPILOGS["upgrade"],
    ).set_defaults(func=cmd_db_upgrade)
    ledger = sub.add_parser("ledger", help="the LiteLLM ledger sink", description="LiteLLM ledger sink commands.")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    status = ledger_sub.add_parser(
        "status",
        help="consumer groups' lag, pending and dead letters; the LiteLLM sink's progress",
        description=(
            "Show each consumer group of the usage stream (billing, litellm): lag, pending entries, the oldest "
            "pending entry's age, dead letters; and from LiteLLM's database the sessions the sink applied and "
            "its schema probe."
        ),
        epilog=_EPILOGS["status"],
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_ledger_status)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `sidecar` console script."""
    args = parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
    except SidecarError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `sidecar models | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's own final flush cannot fail again
        code = 0
    raise SystemExit(code)


if __name__ == "__main__":
    main()
