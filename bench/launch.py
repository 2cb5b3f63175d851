"""Run a module with the `sidecar` package taken from another source tree, when one is named.

    BENCH_SIDECAR_TREE=/tmp/snapshot python -m bench.launch sidecar.cli serve ...

`bench.run --rev REV` extracts `git archive REV sidecar` into a temporary directory and starts the sidecar
and the fake provider through this module, so a committed version can be measured while the working
tree changes. Without BENCH_SIDECAR_TREE it only runs the module. The package is installed in editable
mode, whose import hook outranks PYTHONPATH; `use_tree_from_env` removes that hook in this process.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Final

TREE_VARIABLE: Final = "BENCH_SIDECAR_TREE"


def use_tree_from_env() -> str | None:
    """Import `sidecar` from $BENCH_SIDECAR_TREE from now on (no-op when unset); return the tree."""
    tree = os.environ.get(TREE_VARIABLE)
    if not tree:
        return None
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path.insert(0, tree)
    for name in [n for n in sys.modules if n == "sidecar" or n.startswith("sidecar.")]:
        del sys.modules[name]
    return tree


def main() -> None:
    """`python -m bench.launch MODULE ARGS...`: run MODULE as __main__ with ARGS."""
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.launch MODULE [ARGS...]")
    use_tree_from_env()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
