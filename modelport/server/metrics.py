"""Prometheus metrics of one server, in its own registry (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from modelport.lifecycle.states import State
from modelport.engine.batching import BatchInfo

_LATENCY_BUCKETS = (.001, .0025, .005, .0075, .01, .015, .025, .05, .075, .1, .25, .5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_LOAD_BUCKETS = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("modelport_requests", "Requests answered, by model, protocol and HTTP status.",
                                ["model", "version", "protocol", "status"], registry=r)
        # Tenants come from the keys file only, and models from what the server serves: bounded labels.
        self.tenant_requests = Counter("modelport_tenant_requests", "Requests answered, by tenant (--keys), model "
                                       "('-' before one was chosen: 401, 403, 429) and HTTP status.",
                                       ["tenant", "model", "status"], registry=r)
        self.request_duration = Histogram("modelport_request_duration_seconds", "Time from arrival to answer.",
                                          ["model", "protocol"], buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_duration = Histogram("modelport_decode_duration_seconds", "Image decode + preprocess per request.",
                                         ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("modelport_queue_duration_seconds", "Time waiting for a batch to start.",
                                        ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram("modelport_inference_duration_seconds", "Runtime time per batch.",
                                            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("modelport_batch_size", "Rows per executed batch.", ["model"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batches = Counter("modelport_batches", "Batches executed.", ["model"], registry=r)
        self.thin_batches = Counter("modelport_thin_batches", "Batches that ran thin: beside others, on a share of "
                                    "the cores and at most max_batch_size / concurrent_batches rows.", ["model"],
                                    registry=r)
        self.in_flight = Gauge("modelport_requests_in_flight", "Inference requests being handled now (running or "
                               "waiting), on every protocol; not health checks or scrapes.", registry=r)
        self.model_state = Gauge("modelport_model_state", "1 for each model version's current state.",
                                 ["model", "version", "state"], registry=r)
        self.pipeline_answers = Counter("modelport_pipeline_step_rows", "Images a pipeline step answered (a "
                                        "cascade's: the step that gave the final answer).", ["pipeline", "step"],
                                        registry=r)
        self._request_children: dict[tuple, tuple] = {}
        self.queue_depth = Gauge("modelport_queue_depth", "Requests waiting in a model's queue.", ["model", "version"],
                                 registry=r)
        self.rollout_stage = Gauge("modelport_rollout_stage", "1 for the stage of each model's latest rollout "
                                   "(shadow, canary, promoted, rolled_back), by candidate version.",
                                   ["model", "version", "stage"], registry=r)
        self.rollout_answers = Counter("modelport_rollout_answers", "Answers of a rollout's candidate version, by "
                                       "stage (shadow: compared copies, never returned; canary: returned).",
                                       ["model", "version", "stage"], registry=r)
        self.batch_size_limit = Gauge("modelport_batch_size_limit", "Largest batch the batcher forms now (with a "
                                      "latency SLO: its current choice; otherwise max_batch_size).",
                                      ["model", "version"], registry=r)
        self.predicted_queue = Gauge("modelport_predicted_queue_seconds", "How long a request arriving now would "
                                     "wait for its batch to start, as the batcher predicts it.", ["model", "version"],
                                     registry=r)
        # Under --memory-budget-mb (lifecycle/residency.py): loads, evictions, and what is resident.
        self.model_loads = Counter("modelport_model_loads", "Model versions loaded, by reason: 'new' (it appeared, "
                                   "or the server started), 'demand' (a request found it on disk).",
                                   ["model", "reason"], registry=r)
        self.model_evictions = Counter("modelport_model_evictions", "Model versions unloaded to make room under "
                                       "the memory budget (still on disk, loaded again on first use).", ["model"],
                                       registry=r)
        self.model_load_duration = Histogram("modelport_model_load_seconds", "Time to load and warm a model "
                                             "version, by reason.", ["reason"], buckets=_LOAD_BUCKETS, registry=r)
        self.model_load_wait = Histogram("modelport_model_load_wait_seconds", "Time a request waited for its model "
                                         "version to load from disk.", buckets=_LOAD_BUCKETS, registry=r)

    def rollout_stage_changed(self, model: str, version: int, stage: str) -> None:
        for old in ("shadow", "canary", "promoted", "rolled_back"):
            if old != stage:
                try:
                    self.rollout_stage.remove(model, str(version), old)
                except KeyError:
                    pass
        self.rollout_stage.labels(model, str(version), stage).set(1)

    def rollout_counted(self, model: str, version: int, stage: str, answers: int) -> None:
        self.rollout_answers.labels(model, str(version), stage).inc(answers)

    def follow_batcher(self, model: str, version: int, batcher) -> None:
        labels = (model, str(version))
        self.queue_depth.labels(*labels).set_function(lambda: batcher.queued)
        self.batch_size_limit.labels(*labels).set_function(lambda: batcher.planner.cap)
        self.predicted_queue.labels(*labels).set_function(batcher.predicted_wait_s)

    def follow_residency(self, residency) -> None:
        """The memory budget's gauges, read at each scrape (created only for a server with a budget)."""
        r = self.registry
        Gauge("modelport_memory_budget_bytes", "The memory budget (--memory-budget-mb).",
              registry=r).set(residency.budget_bytes)
        Gauge("modelport_memory_base_bytes", "The server's RSS before any model loaded: the budget is on top of it.",
              registry=r).set(residency.base_bytes)
        Gauge("modelport_memory_in_use_bytes", "What counts against the budget now: the larger of the resident "
              "versions' sizes and the RSS above the base.", registry=r).set_function(residency.in_use_bytes)
        Gauge("modelport_model_resident_bytes", "The resident model versions' sizes (each: RSS growth over its "
              "load).", registry=r).set_function(lambda: residency.resident_bytes)
        Gauge("modelport_models_resident", "Model versions in memory now (the others wait on disk).",
              registry=r).set_function(lambda: len(residency.resident()))

    def model_loaded(self, model: str, version: int, reason: str, seconds: float) -> None:
        self.model_loads.labels(model, reason).inc()
        self.model_load_duration.labels(reason).observe(seconds)

    def model_evicted(self, model: str, version: int) -> None:
        self.model_evictions.labels(model).inc()

    def load_waited(self, seconds: float) -> None:
        self.model_load_wait.observe(seconds)

    def in_flight_now(self) -> int:
        return int(self.in_flight._value.get())  # prometheus_client keeps the number here

    def observe_tenant(self, tenant: str, model: str, status: int) -> None:
        self.tenant_requests.labels(tenant, model, str(status)).inc()

    def observe_request(self, model: str, version: int | str, protocol: str, status: int, seconds: float) -> None:
        key = (model, version, protocol, status)
        children = self._request_children.get(key)
        if children is None:
            # labels() takes a lock and builds a tuple on every call; the label sets are few.
            children = self._request_children[key] = (
                self.requests.labels(model, str(version), protocol, str(status)),
                self.request_duration.labels(model, protocol))
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, model: str, info: BatchInfo) -> None:
        self.batches.labels(model).inc()
        if info.thin:
            self.thin_batches.labels(model).inc()
        self.batch_size.labels(model).observe(info.rows)
        self.inference_duration.labels(model).observe(info.run_s)
        queue = self.queue_duration.labels(model)
        for seconds in info.queue_s:
            queue.observe(seconds)

    def state_changed(self, model: str, version: int, old: str | None, new: str | None) -> None:
        if old is not None and old != new:
            try:
                self.model_state.remove(model, str(version), old)
            except KeyError:
                pass
        if new is not None:
            self.model_state.labels(model, str(version), new).set(1)
        if new in (None, State.ROLLED_BACK):  # unloaded: drop its series, and the gauge callbacks that would keep it alive
            for gauge in (self.queue_depth, self.batch_size_limit, self.predicted_queue):
                try:
                    gauge.remove(model, str(version))
                except KeyError:
                    pass

    def observe_pipeline_step(self, pipeline: str, step: str, rows: int) -> None:
        if rows:
            self.pipeline_answers.labels(pipeline, step).inc(rows)

    def observe_decode(self, model: str, seconds: float) -> None:
        self.decode_duration.labels(model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
