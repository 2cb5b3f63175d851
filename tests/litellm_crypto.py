"""LiteLLM's own sealing helpers (`litellm.proxy.common_utils.encrypt_decrypt_utils`), run in a child process.

Importing `litellm` in the test process would install its logging filters on the root and uvicorn loggers
(they rewrite records the sidecar's own redaction is tested on) and cost ~4 s and ~200 MB in every pytest
run, since collection imports every test module. So the tests call LiteLLM's functions through one child
process, started on first use and kept for the session: one JSON line per call each way.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from typing import Any

_CHILD = r"""
import json, sys
from litellm.proxy.common_utils import encrypt_decrypt_utils as crypto
for line in sys.stdin:
    call = json.loads(line)
    try:
        result = {"ok": getattr(crypto, call["fn"])(*call["args"], **call["kwargs"])}
    except Exception as exc:  # report it to the test, keep serving
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
"""

_lock = threading.Lock()
_child: subprocess.Popen[str] | None = None


def _process() -> subprocess.Popen[str]:
    global _child
    if _child is None or _child.poll() is not None:
        # LiteLLM would fetch its price map from the network when imported without this.
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        _child = subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        atexit.register(_child.kill)
    return _child


def _call(fn: str, *args: Any, **kwargs: Any) -> Any:
    with _lock:
        child = _process()
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps({"fn": fn, "args": args, "kwargs": kwargs}) + "\n")
        child.stdin.flush()
        line = child.stdout.readline()
    if not line:
        raise RuntimeError("the LiteLLM crypto child process exited")
    answer = json.loads(line)
    if "error" in answer:
        raise RuntimeError(f"litellm {fn}: {answer['error']}")
    return answer["ok"]


def encrypt_value_helper(value: str, new_encryption_key: str | None = None) -> str:
    """LiteLLM's `encrypt_value_helper` (the proxy's default sealing, nacl SecretBox)."""
    return str(_call("encrypt_value_helper", value, new_encryption_key=new_encryption_key))


def _encrypt_aes_gcm(*, value: str, signing_key: str) -> str:
    """LiteLLM's `_encrypt_aes_gcm` (`encryption_algorithm: aes-256-gcm`, the `v2:gcm:` form)."""
    return str(_call("_encrypt_aes_gcm", value=value, signing_key=signing_key))


def decrypt_if_encrypted_with(value: str, key: str) -> str | None:
    """LiteLLM's `decrypt_if_encrypted_with`: the opened value, or None when `key` does not open it."""
    result = _call("decrypt_if_encrypted_with", value, key)
    return None if result is None else str(result)
