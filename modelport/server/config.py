"""Server settings: one object, units in the names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from modelport.engine.imaging import DEFAULT_MAX_PIXELS
from modelport.engine.service import DEFAULT_MAX_IMAGES

DEFAULT_PORT = 12480  # the article's port


@dataclass(frozen=True)
class BatchingOverrides:
    """Command-line overrides of every bundle's [serving] section; None keeps the bundle's."""

    max_batch_size: int | None = None
    max_delay_ms: float | None = None
    max_queue_size: int | None = None
    latency_slo_ms: float | None = None
    concurrent_batches: int | None = None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    zmq_port: int | None = None  # ZeroMQ front-end beside HTTP, same host and models; None = off
    grpc_port: int | None = None  # gRPC (Open Inference Protocol) beside HTTP, same host and models; None = off
    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images_per_request: int = DEFAULT_MAX_IMAGES  # 413 above; below, split into batches of max_batch_size
    max_json_depth: int = 32
    max_inputs: int = 16  # tensors in one V2 request
    timeout_ms: float = 30_000  # server default deadline; a request header may only lower it
    exit_timeout_s: float = 30.0  # SIGTERM: longest wait for in-flight requests
    read_timeout_s: float = 30.0  # a request's headers and body must arrive within this
    write_timeout_s: float = 30.0  # a client that reads nothing for this long is cut off
    decode_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    runtime_threads: int | None = None  # None: one per core
    device: str | None = None  # cpu | cuda[:N] | auto for every model; None: each bundle's [serving] device
    engine: str | None = None  # auto | onnxruntime | openvino for every ONNX model; None: each bundle's [serving] runtime
    precision: str | None = None  # auto | fp32 | bf16 | int8 for every model; None: each bundle's [serving] precision
    batching: BatchingOverrides = BatchingOverrides()
    settle_s: float = 0.5  # a version directory counts once its files stop changing for this long
    poll_s: float = 1.0  # repository rescan interval, besides file-system events
    admin_token: str | None = None  # enables the V2 repository API (index, load, unload); None = off
    worker_id: str = ""  # names this server in every response and in the cluster; set at start
    cluster: str | None = None  # etcd://HOST:PORT/NAME: register there once ready; None = standalone
    advertise: str | None = None  # the host others reach this server at (default: the bound host)
    lease_ttl_s: int = 3  # member key lifetime in etcd without refresh (a dead worker's key goes after this)
    drain_s: float = 3.0  # SIGTERM in a cluster: serve on this long after announcing "draining"
    log_level: str = "info"
    otlp_endpoint: str | None = None  # OTLP/HTTP receiver of traces; None: OTEL_EXPORTER_OTLP_ENDPOINT, or off
    trace_sample: float | None = None  # share of new traces sampled (parent-based); None: 0.01 or OTEL_TRACES_SAMPLER
    keys_file: str | None = None  # TOML of tenants and their hashed API keys; None: open to anyone (no tenants)
    memory_budget_mb: float | None = None  # models beyond this stay on disk, loaded on first use; None: all resident
