"""The LiteLLM sink: realtime spend written into LiteLLM's own PostgreSQL ledger (issue 14).

So far only `schema`: what the sink finds in LiteLLM's database before it writes anything.
"""
