"""`rosetool bench`: one workload, one set of metrics, any backend (bundled runtime, transformers, HTTP)."""
