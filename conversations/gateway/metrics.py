"""Prometheus metrics for the gateway (served at /metrics).

Under python -m config.serve the workers share them through files
(prometheus-client's multiprocess mode, config/serve.py), so one scrape
covers every worker. Under another server they are per process unless
PROMETHEUS_MULTIPROC_DIR is set the same way. Only counters and histograms:
gauges would need a multiprocess mode each."""

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "gateway_requests_total", "Chat completion requests by governance outcome and error code", ["outcome", "code"]
)
LATENCY = Histogram(
    "gateway_request_seconds",
    "Time to the response head (whole body for non-streaming)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DB_WRITES = Counter(
    "gateway_db_writes_total",
    "Calls opened or finished on Postgres, by how they were committed: alone, in a shared transaction "
    "(group commit), or alone again after their batch was rejected",
    ["phase", "mode"],
)
DB_BATCHES = Counter("gateway_db_batches_total", "Shared transactions written by group commit", ["phase"])
BUDGET_RACES = Counter(
    "gateway_budget_reopened_total",
    "Calls opened a second time with the budget rows locked first: a concurrent request took the "
    "headroom between the unlocked cap check and the locked one (rare except near a cap)",
)
ADMISSIONS = Counter(
    "gateway_admissions_total",
    "Requests admitted on the event loop (decided from memory) or on a database thread, and what the "
    "thread was needed for (configuration not cached, a budget reading too old, rate limits, a refusal to record, ...)",
    ["where", "reason"],
)
