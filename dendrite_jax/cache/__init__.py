"""KV cache: device pages and metadata (kv.py), host page accounting (pool.py)."""
