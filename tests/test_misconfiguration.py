"""Misconfiguration gets one clear line, at start, with exit status 2: real `sidecar ...` processes.

Each test runs the command as an operator would (`python -m sidecar.cli`, the console script's code) and
checks its exit status and its whole stderr: exactly one line `sidecar: ...`, never a traceback. The table of
these cases is in docs/api.md, "The CLI".
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.billing_support import SidecarProcess

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "config.yaml"
PROVIDER_KEYS = {"OPENAI_API_KEY": "sk-test-openai", "AZURE_API_KEY": "sk-test-azure", "AZURE_API_BASE": "https://x"}
UNPRICED = {
    "model_name": "my-transcriber",
    "litellm_params": {"model": "openai/my-transcriber", "api_base": "ws://127.0.0.1:9", "api_key": "sk-x"},
    "model_info": {"realtime": True, "mode": "audio_transcription"},
}


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without SIDECAR_*/provider/LiteLLM variables, plus `env`."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIDECAR_", "OPENAI_", "AZURE_", "LITELLM_", "PYTHONMALLOC"))
    }
    return {**base, "PYTHONMALLOC": "malloc", "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}


def run(*args: str, env: dict[str, str] | None = None, **options: object) -> subprocess.CompletedProcess[str]:
    """`sidecar ARGS` to completion."""
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "sidecar.cli", *args],
        env=environment(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **options,
    )


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a refusal (exit 2, nothing else on stderr, no traceback, nothing served)."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("sidecar"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def config_file(tmp_path: Path, *entries: dict[str, object], master_key: str | None = "sk-master") -> Path:
    """A LiteLLM config.yaml with these model_list entries."""
    config: dict[str, object] = {"model_list": list(entries)}
    if master_key is not None:
        config["general_settings"] = {"master_key": master_key}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def listening() -> Iterator[int]:
    """A port some other process is already listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """`sidecar serve` on the example config, embedded mode, files under tmp_path."""
    return {
        "SIDECAR_LITELLM_CONFIG": str(EXAMPLE),
        "SIDECAR_DATABASE_URL": f"sqlite:///{tmp_path / 'billing.db'}",
        "SIDECAR_SPOOL_DIR": str(tmp_path / "spool"),
        **PROVIDER_KEYS,
        **extra,
    }


# --- serve --------------------------------------------------------------------------------------------


def test_serve_missing_config_file_is_one_line(tmp_path: Path) -> None:
    """`serve` with a config path that does not exist: one line naming the file and why, exit 2."""
    line = refused(run("serve", env=serve_env(tmp_path, SIDECAR_LITELLM_CONFIG=str(tmp_path / "nope.yaml"))))
    assert line == f"sidecar: cannot read the LiteLLM config {tmp_path / 'nope.yaml'}: No such file or directory"


def test_serve_unreadable_config_is_one_line(tmp_path: Path) -> None:
    """`serve` with a config path that cannot be read as a file (a directory): one line, exit 2."""
    line = refused(run("serve", env=serve_env(tmp_path, SIDECAR_LITELLM_CONFIG=str(tmp_path))))
    assert line == f"sidecar: cannot read the LiteLLM config {tmp_path}: Is a directory"


def test_serve_yaml_error_names_line_and_column(tmp_path: Path) -> None:
    """Invalid YAML: one line with the line and column of the problem (and not the text, which may be a key)."""
    bad = tmp_path / "config.yaml"
    bad.write_text("model_list:\n  - model_name: x\n   api_key: sk-secret-in-bad-yaml\n")
    line = refused(run("serve", env=serve_env(tmp_path, SIDECAR_LITELLM_CONFIG=str(bad))))
    assert line.startswith(f"sidecar: the LiteLLM config {bad} is not valid YAML: line 3, column 4: ")
    assert "sk-secret" not in line


def test_serve_without_config_variable_is_one_line(tmp_path: Path) -> None:
    """`serve` without SIDECAR_LITELLM_CONFIG: one line naming the variable."""
    line = refused(run("serve", env=serve_env(tmp_path, SIDECAR_LITELLM_CONFIG="")))
    assert "SIDECAR_LITELLM_CONFIG" in line


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SIDECAR_ROUNDING_INCREMENT", "0"),
        ("SIDECAR_ROUNDING_INCREMENT", "-1"),
        ("SIDECAR_ROUNDING_INCREMENT", "NaN"),
        ("SIDECAR_MAX_SESSIONS", "0"),
        ("SIDECAR_DRAIN_GRACE_S", "-5"),
    ],
)
def test_serve_non_positive_number_is_one_line(tmp_path: Path, variable: str, value: str) -> None:
    """A number that is not positive (SIDECAR_ROUNDING_INCREMENT=0 used to fail every session with 500)."""
    line = refused(run("serve", env=serve_env(tmp_path, **{variable: value})))
    assert line == f"sidecar: {variable} must be positive, got {value!r}"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("serve", "--workers", "0"), "sidecar serve: argument --workers: must be positive, got '0'"),
        (("serve", "--port", "-1"), "sidecar serve: argument --port: must be positive, got '-1'"),
        (("smoke", "gpt-realtime", "--timeout", "0"), "sidecar smoke: argument --timeout: must be positive, got '0'"),
    ],
)
def test_non_positive_option_is_one_line(tmp_path: Path, args: tuple[str, ...], line: str) -> None:
    """A non-positive `--workers`, `--port` or `--timeout`: one line (not argparse's usage block), exit 2."""
    assert refused(run(*args, env=serve_env(tmp_path))) == f"{line} (see sidecar {args[0]} --help)"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("localhost:6379", "must start with redis://, rediss:// or unix://"),
        ("http://redis:6379", "must start with redis://, rediss:// or unix://"),
        ("redis://redis:port/0", "is not a URL (a bad port?)"),
        ("redis://redis:6379/zero", "path must be a database number"),
        ("redis:///0", "names no host"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "consume"])
def test_malformed_redis_url_is_one_line(tmp_path: Path, command: str, url: str, why: str) -> None:
    """A malformed SIDECAR_REDIS_URL stops `serve` and `consume` at start (consume used to trace back)."""
    line = refused(run(command, env=serve_env(tmp_path, SIDECAR_REDIS_URL=url)))
    assert line.startswith("sidecar: SIDECAR_REDIS_URL") and why in line
    assert url not in line  # a URL may carry a password


@pytest.mark.parametrize("args", [("serve",), ("consume",), ("db", "upgrade")], ids=" ".join)
@pytest.mark.parametrize(
    ("url", "line"),
    [
        ("not a url", "sidecar: SIDECAR_DATABASE_URL is not a database URL"),
        ("mysql://u@db/billing", "sidecar: unsupported billing database 'mysql': use sqlite or postgresql"),
    ],
)
def test_malformed_database_url_is_one_line(tmp_path: Path, args: tuple[str, ...], url: str, line: str) -> None:
    """A malformed SIDECAR_DATABASE_URL stops every command that uses it (`serve` in embedded mode too)."""
    env = serve_env(tmp_path, SIDECAR_DATABASE_URL=url)
    if args == ("consume",):
        env["SIDECAR_REDIS_URL"] = "redis://127.0.0.1:6379/0"
    assert refused(run(*args, env=env)) == line


def test_serve_unusable_sqlite_database_is_one_line(tmp_path: Path) -> None:
    """Embedded mode with a SQLite file in a directory that does not exist: one line, exit 2 (not exit 3 and a
    traceback from the lifespan)."""
    url = f"sqlite:///{tmp_path / 'missing' / 'billing.db'}"
    line = refused(run("serve", env=serve_env(tmp_path, SIDECAR_DATABASE_URL=url)))
    assert line.startswith("sidecar: billing upgrade: database failure: OperationalError: unable to open database file")


def test_serve_unusable_spool_dir_is_one_line(tmp_path: Path) -> None:
    """A SIDECAR_SPOOL_DIR that cannot be created (under a file): one line naming it, exit 2."""
    (tmp_path / "file").write_text("")
    spool = tmp_path / "file" / "spool"
    line = refused(run("serve", env=serve_env(tmp_path, SIDECAR_SPOOL_DIR=str(spool))))
    assert line == f"sidecar: SIDECAR_SPOOL_DIR {spool} cannot be created: Not a directory"


def test_serve_port_in_use_is_one_line(tmp_path: Path, listening: int) -> None:
    """A port another process listens on: one line naming the address, exit 2 (not a traceback)."""
    line = refused(run("serve", "--port", str(listening), env=serve_env(tmp_path)))
    assert line == f"sidecar: cannot listen on 127.0.0.1:{listening}: Address already in use"


def test_serve_refuses_an_unpriced_realtime_model(tmp_path: Path) -> None:
    """A realtime model with no price is refused at start (billing $0 silently is a money leak)."""
    config = config_file(tmp_path, UNPRICED)
    line = refused(run("serve", env=serve_env(tmp_path, SIDECAR_LITELLM_CONFIG=str(config))))
    assert line.startswith("sidecar: realtime model my-transcriber has no price")
    assert "SIDECAR_ALLOW_UNPRICED=1" in line


def test_serve_several_workers_without_redis_is_one_line(tmp_path: Path) -> None:
    """`--workers 2` in embedded mode: one line, exit 2."""
    line = refused(run("serve", "--workers", "2", env=serve_env(tmp_path)))
    assert line.startswith("sidecar: 2 workers need SIDECAR_REDIS_URL")


async def test_serve_with_allowed_unpriced_model_warns_and_logs_its_start(tmp_path: Path) -> None:
    """SIDECAR_ALLOW_UNPRICED=1 serves the unpriced model; the log warns naming it and each entry without a
    key, then says where it serves, in which mode, with how many workers and models."""
    keyless = {"model_name": "gpt-realtime", "litellm_params": {"model": "openai/gpt-realtime"}}
    env_key = {
        "model_name": "gpt-realtime",
        "litellm_params": {"model": "openai/gpt-realtime", "api_key": "os.environ/SOME_UNSET_KEY"},
    }
    config = config_file(tmp_path, UNPRICED, keyless, env_key)
    env = serve_env(tmp_path, SIDECAR_LITELLM_CONFIG=str(config), SIDECAR_ALLOW_UNPRICED="1")
    sidecar = SidecarProcess(environment(env), workdir=tmp_path / "run")
    await sidecar.start()
    try:
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{sidecar.http}/v1/realtime/models")).json()["data"][0]["pricing"] == {}
        assert await sidecar.terminate() == 0
    finally:
        await sidecar.kill()
    log = sidecar.log.read_text()
    assert "config: my-transcriber: realtime model with no price (its sessions bill $0)" in log
    assert "config: model_list[1] (gpt-realtime): no litellm_params.api_key" in log
    assert "config: model_list[2] (gpt-realtime): litellm_params.api_key os.environ/SOME_UNSET_KEY is not set" in log
    port = sidecar.port
    assert f"serving on 127.0.0.1:{port}: embedded mode, 1 worker, 2 realtime models" in log
    assert "draining: new sessions refused; waiting up to 20s for 0 live sessions" in log
    assert "Traceback" not in log


# --- consume and db upgrade ---------------------------------------------------------------------------


def test_consume_without_redis_is_one_line() -> None:
    """`consume` without SIDECAR_REDIS_URL: one line, exit 2 (and SIDECAR_LITELLM_CONFIG is not needed)."""
    line = refused(run("consume"))
    assert line == (
        "sidecar: sidecar consume needs SIDECAR_REDIS_URL, SIDECAR_REDIS_SENTINEL_NODES or SIDECAR_REDIS_CLUSTER_NODES"
        " (embedded mode bills in-process)"
    )


REDIS_HA_MISCONFIGURATIONS = [
    (
        {"SIDECAR_REDIS_SENTINEL_NODES": "127.0.0.1:26379", "SIDECAR_REDIS_CLUSTER_NODES": "127.0.0.1:7000"},
        "sidecar: set only one of SIDECAR_REDIS_SENTINEL_NODES and SIDECAR_REDIS_CLUSTER_NODES: they name different"
        " kinds of Redis",
    ),
    (
        {"SIDECAR_REDIS_SENTINEL_NODES": "127.0.0.1:26379"},
        "sidecar: SIDECAR_REDIS_SENTINEL_NODES needs SIDECAR_REDIS_SERVICE_NAME (the master's name, e.g. mymaster)",
    ),
    (
        {"SIDECAR_REDIS_CLUSTER_NODES": "127.0.0.1:7000,127.0.0.1:seven"},
        "sidecar: SIDECAR_REDIS_CLUSTER_NODES has a node whose port is not a number: '127.0.0.1:seven'",
    ),
    (
        {"SIDECAR_REDIS_SENTINEL_NODES": '[["127.0.0.1", 26379]', "SIDECAR_REDIS_SERVICE_NAME": "mymaster"},
        "sidecar: SIDECAR_REDIS_SENTINEL_NODES is not valid JSON (Expecting ',' delimiter);"
        " or write host:port,host:port",
    ),
]


@pytest.mark.parametrize(("env", "message"), REDIS_HA_MISCONFIGURATIONS, ids=["both", "no-service", "port", "json"])
@pytest.mark.parametrize("command", ["serve", "consume"])
def test_contradictory_redis_settings_are_one_line(
    tmp_path: Path, command: str, env: dict[str, str], message: str
) -> None:
    """Sentinel and Cluster both set, a node list that does not parse, Sentinel without its service name:
    `serve` and `consume` each refuse with one line naming the setting, exit 2."""
    settings = serve_env(tmp_path, **env) if command == "serve" else env
    assert refused(run(command, env=settings)) == message


def test_db_upgrade_needs_no_litellm_config(tmp_path: Path) -> None:
    """`db upgrade` runs without SIDECAR_LITELLM_CONFIG (it never reads the LiteLLM config)."""
    result = run("db", "upgrade", env={"SIDECAR_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}"})
    assert (result.returncode, result.stdout, result.stderr) == (0, "billing tables ready\n", "")


async def test_consume_waits_for_a_database_down_at_start(redis_url: str) -> None:
    """`consume` with PostgreSQL down at start (and no LiteLLM config) logs each failed attempt and keeps
    retrying instead of exiting 2; SIGTERM then stops it with status 0."""
    with socket.socket() as sock:  # a port nothing listens on: the database is "down"
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = environment(
        {
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/test",
            "SIDECAR_DB_TIMEOUT_S": "2",
        }
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar.cli", "consume", env=env, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(60):
            lines = [await process.stderr.readline() for _ in range(2)]
            assert [b"billing database not ready at start" in line for line in lines] == [True, True], lines
            assert b"retrying in 0.5s" in lines[0] and b"retrying in 1.0s" in lines[1]  # each attempt, backing off
            assert process.returncode is None  # still retrying
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            rest = await process.stderr.read()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert b"Traceback" not in rest


# --- every command ------------------------------------------------------------------------------------


def test_models_into_a_closed_pipe_does_not_trace_back() -> None:
    """`sidecar models | head`: a reader that stops reading ends the command quietly, status 0."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "models"],
            env=environment({"SIDECAR_LITELLM_CONFIG": str(EXAMPLE), **PROVIDER_KEYS}),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (0, "")


def test_models_warns_naming_each_entry(tmp_path: Path) -> None:
    """`models` warns on stderr, naming the entry: a skipped realtime entry, a missing key, an unpriced model."""
    skipped = {
        "model_name": "gemini-live",
        "litellm_params": {"model": "gemini/gemini-live", "api_key": "k"},
        "model_info": {"realtime": True},
    }
    keyless = {"model_name": "gpt-realtime", "litellm_params": {"model": "openai/gpt-realtime"}}
    result = run("models", env={"SIDECAR_LITELLM_CONFIG": str(config_file(tmp_path, skipped, keyless, UNPRICED))})
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "sidecar: warning: model_list[0] (gemini-live) skipped: realtime, but the sidecar relays only openai/, "
        "azure/ and xai/ models, not gemini/",
        "sidecar: warning: model_list[1] (gpt-realtime): no litellm_params.api_key (sent to the upstream without a "
        "credential)",
        "sidecar: warning: my-transcriber: realtime model with no price (its sessions bill $0)",
    ]


def test_models_warns_about_an_empty_model_list(tmp_path: Path) -> None:
    """A config with no realtime model: `models` says so on stderr."""
    result = run("models", env={"SIDECAR_LITELLM_CONFIG": str(config_file(tmp_path))})
    assert result.returncode == 0
    assert result.stderr == "sidecar: warning: no realtime model in the config: every session will be refused\n"


def test_version() -> None:
    """`sidecar --version` prints the installed version."""
    result = run("--version")
    assert (result.returncode, result.stdout) == (0, "sidecar 0.1.0\n")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("serve",), ("--host", "--port", "--workers", "SIDECAR_LITELLM_CONFIG", "SIDECAR_ALLOW_UNPRICED")),
        (("consume",), ("SIDECAR_REDIS_URL", "SIDECAR_DATABASE_URL", "SIDECAR_LOST_AFTER_S")),
        (("models",), ("--json", "SIDECAR_LITELLM_CONFIG", "LITELLM_MASTER_KEY")),
        (("smoke",), ("--timeout", "MODEL", "SIDECAR_LITELLM_CONFIG")),
        (("db", "upgrade"), ("SIDECAR_DATABASE_URL", "SIDECAR_DB_TIMEOUT_S")),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, tuple) and value[0][0] != "-" else "",
)
def test_every_help_names_its_options_and_variables(args: tuple[str, ...], named: tuple[str, ...]) -> None:
    """Each subcommand's --help describes its options and the variables it reads."""
    result = run(*args, "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert [name for name in named if name not in text] == []
