"""Every Prometheus metric of outbox, defined here and nowhere else."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

PUBLISHED = Counter(
    "outbox_published", "Rows confirmed by the broker (then deleted or marked sent)",
    registry=REGISTRY)
FAILURES = Counter(
    "outbox_publish_failures", "Rows whose publish failed, by reason",
    ["reason"], registry=REGISTRY)
DEAD = Counter(
    "outbox_dead", "Rows this relay parked as dead", registry=REGISTRY)
RELEASED = Counter(
    "outbox_released", "Rows returned to pending unsettled (connection lost before the confirm)",
    registry=REGISTRY)
BATCH_SIZE = Histogram(
    "outbox_batch_size", "Rows per claimed batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000), registry=REGISTRY)
COMMIT_TO_CONFIRM = Histogram(
    "outbox_commit_to_confirm_seconds",
    "From the row's created_at (its transaction's start) to the broker's confirm",
    buckets=(0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1,
             0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY)
PENDING = Gauge(
    "outbox_pending", "Rows waiting to be published (including those waiting for a retry)",
    registry=REGISTRY)
DEAD_ROWS = Gauge(
    "outbox_dead_rows", "Rows parked as dead in the table", registry=REGISTRY)
BLOCKED_KEYS = Gauge(
    "outbox_blocked_keys", "Ordering keys blocked by a dead row", registry=REGISTRY)
OLDEST_PENDING_AGE = Gauge(
    "outbox_oldest_pending_age_seconds", "Age of the oldest pending row (the lag)",
    registry=REGISTRY)
HORIZON_AGE = Gauge(
    "outbox_horizon_age_seconds",
    "Age of the oldest transaction still running in the cluster that has written something (or "
    "of a prepared one): keyed rows written after it began wait for it to end; 0 when none",
    registry=REGISTRY)
HELD_BACK_ROWS = Gauge(
    "outbox_held_back_rows",
    "Keyed pending rows held back by the ordering horizon (written after the oldest running "
    "writing transaction began)", registry=REGISTRY)
CONNECTED = Gauge(
    "outbox_connected", "1 when connected (target: database or broker)", ["target"],
    registry=REGISTRY)
BROKER_BLOCKED = Gauge(
    "outbox_broker_blocked", "1 while the broker blocks publishers (memory or disk alarm)",
    registry=REGISTRY)
TASK_ERRORS = Counter(
    "outbox_task_errors",
    "Unexpected errors in the relay's background tasks, by task (a task logs an error once "
    "and retries; one that ends anyway stops the relay with a non-zero exit)",
    ["task"], registry=REGISTRY)
SECONDS_SINCE_CLAIM = Gauge(
    "outbox_seconds_since_claim",
    "Seconds since a lane of this relay last began a claim. A ready relay claims at least every "
    "two poll intervals, even idle: a value that keeps growing while outbox_ready is 1 is a "
    "stuck relay (the log says so too; SIGUSR1 logs where each task waits)",
    registry=REGISTRY)
READY = Gauge(
    "outbox_ready", "1 when the relay is ready (connected to both, not blocked)",
    registry=REGISTRY)

FAILURE_REASONS = ("nack", "returned", "channel", "timeout", "connection", "poison")
for _reason in FAILURE_REASONS:
    FAILURES.labels(_reason)
TASKS = ("broker", "listen", "stats", "wakeup_flag", "http")
for _task in TASKS:
    TASK_ERRORS.labels(_task)
for _target in ("database", "broker"):
    CONNECTED.labels(_target).set(0)
