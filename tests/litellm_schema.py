"""LiteLLM's real schema and seeded rows for the tests: re-exported from sidecar.testing.litellm_schema.

The helpers live in the package so that the ledger benchmark (bench/ledger.py) builds the same schema.
"""

from sidecar.testing.litellm_schema import (
    Principal,
    apply_migrations,
    key_hash,
    migration_files,
    seed_principal,
    unique_keys_in_migrations,
)

__all__ = [
    "Principal",
    "apply_migrations",
    "key_hash",
    "migration_files",
    "seed_principal",
    "unique_keys_in_migrations",
]
