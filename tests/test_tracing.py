"""OpenTelemetry traces, seen by a real OTLP/HTTP receiver that decodes the protobuf payloads with
opentelemetry-proto: one trace from the client through the worker and a pipeline's steps to the
batches, with the right parents; a caller's traceparent continued; nothing sent when tracing is off."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from conftest import make_tiny_bundle
from servers import Server, wait_until

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class Receiver:
    """An OTLP/HTTP trace receiver: every span it is sent, as plain dicts."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = next((a.value.string_value for a in resource.resource.attributes
                                    if a.key == "service.name"), "")
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            receiver.spans.append({
                                "name": span.name, "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(), "service": service,
                                "links": [link.span_id.hex() for link in span.links],
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "error": span.status.code == 2})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def named(self, prefix: str) -> list[dict]:
        return [s for s in self.spans if s["name"].startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()


def _value(value):
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A worker that traces every request, serving two tiny models and a cascade of them."""
    receiver = Receiver()
    root = tmp_path_factory.mktemp("traced")
    for name, seed in (("cheap", 0), ("accurate", 1)):
        make_tiny_bundle(root / "repo" / name / "1", seed=seed, serving={"top_k": 3, "max_delay_ms": 0})
    (root / "repo" / "smart").mkdir()
    (root / "repo" / "smart" / "pipeline.toml").write_text(
        'kind = "cascade"\nsteps = ["cheap", "accurate"]\nescalate_below = 1\n')  # no image is that sure: every image goes on
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    server = Server(str(root / "repo"), "--otlp-endpoint", receiver.url, "--trace-sample", "1",
                    log=root / "server.log", env=env).wait_ready()
    yield server, receiver
    server.stop()
    receiver.close()
    assert "Traceback" not in server.log.read_text()


CLIENT = """
import sys
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from modelport import Client, samples

provider = TracerProvider(resource=Resource.create({"service.name": "the-app"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[2] + "/v1/traces")))
trace.set_tracer_provider(provider)
with trace.get_tracer("app").start_as_current_span("app.work") as root:
    with Client(sys.argv[1], model="smart") as client:
        client.classify(samples.jpeg(samples.photo("chelsea")))
    print(format(root.get_span_context().trace_id, "032x"))
provider.shutdown()
"""


def test_one_trace_runs_from_the_client_through_the_pipeline_steps_to_the_batches(traced):
    server, receiver = traced
    receiver.spans.clear()
    result = subprocess.run([sys.executable, "-c", CLIENT, server.url, receiver.url], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    trace_id = result.stdout.strip()
    wait_until(lambda: len(receiver.named("modelport.batch")) >= 2, 10, what="the worker's batch spans")
    spans = [s for s in receiver.spans if s["trace"] == trace_id]
    assert {s["trace"] for s in receiver.spans} == {trace_id}  # one trace, and nothing else sent
    by_name = {s["name"]: s for s in spans}
    app, client = by_name["app.work"], by_name["modelport.client classify"]
    request = by_name["modelport.request smart"]
    assert client["parent"] == app["id"] and client["service"] == "the-app"
    assert request["parent"] == client["id"] and request["service"].startswith("modelport ")
    assert request["attributes"]["modelport.model"] == "smart" and request["attributes"]["http.response.status_code"] == 200
    for step in ("cheap", "accurate"):  # the cascade escalates every image: both steps ran
        step_span = by_name[f"modelport.pipeline.step {step}"]
        assert step_span["parent"] == request["id"]
        batch = by_name[f"modelport.batch {step}"]
        assert batch["parent"] == step_span["id"] and step_span["id"] in batch["links"]
        assert batch["attributes"]["modelport.batch.rows"] == 1
        assert batch["attributes"]["modelport.engine"] and batch["attributes"]["modelport.precision"]
        queue = [s for s in spans if s["name"] == "modelport.queue" and s["parent"] == step_span["id"]]
        assert len(queue) == 1
    # A pipeline decodes each image once, when its first step needs it; the later step reuses it.
    (decode,) = [s for s in spans if s["name"] == "modelport.decode"]
    assert decode["parent"] == by_name["modelport.pipeline.step cheap"]["id"]


def test_a_callers_traceparent_is_continued_and_errors_are_marked(traced):
    server, receiver = traced
    receiver.spans.clear()
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent}-01"}
    from modelport import samples

    photo = samples.jpeg(samples.photo("coffee"))
    assert httpx.post(server.url + "/?model=cheap", files={"data": photo}, headers=headers).status_code == 200
    assert httpx.post(server.url + "/?model=cheap", files={"data": b"not an image"}, headers=headers).status_code == 400
    wait_until(lambda: len(receiver.named("modelport.request cheap")) >= 2, 10, what="the request spans")
    requests = receiver.named("modelport.request cheap")
    assert {(s["trace"], s["parent"]) for s in requests} == {(trace_id, parent)}
    assert sorted(s["attributes"]["http.response.status_code"] for s in requests) == [200, 400]
    (decode,) = [s for s in receiver.named("modelport.decode") if s["trace"] == trace_id]
    assert decode["parent"] in {s["id"] for s in requests}


def test_without_an_endpoint_nothing_is_traced(tmp_path):
    receiver = Receiver()
    make_tiny_bundle(tmp_path / "repo" / "tiny" / "1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    server = Server(str(tmp_path / "repo"), log=tmp_path / "server.log", env=env).wait_ready()
    try:
        headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        from modelport import samples

        assert httpx.post(server.url + "/?model=tiny", files={"data": samples.jpeg(samples.photo("coffee"))},
                          headers=headers).status_code == 200
        time.sleep(0.3)
        assert receiver.spans == [] and "tracing to" not in server.log.read_text()
    finally:
        server.stop()
        receiver.close()


def test_one_trace_goes_from_the_client_through_the_balancer_and_a_worker_to_the_pipeline_steps_batches(
        cluster, tmp_path):
    """HAProxy in `modelport balance` passes traceparent through: the worker's request span is the
    client's child, and the pipeline's steps and batches follow in the same trace."""
    receiver = Receiver()
    repo = tmp_path / "repo"
    for name, seed in (("cheap", 0), ("accurate", 1)):
        make_tiny_bundle(repo / name / "1", seed=seed, serving={"top_k": 3, "max_delay_ms": 0})
    (repo / "smart").mkdir()
    (repo / "smart" / "pipeline.toml").write_text('kind = "cascade"\nsteps = ["cheap", "accurate"]\nescalate_below = 1\n')
    try:
        cluster.start_worker("--otlp-endpoint", receiver.url, "--trace-sample", "1", repo=repo)
        balancer = cluster.start_balancer()
        wait_until(lambda: len(balancer.servers()) == 1, 10, what="HAProxy has the worker")
        result = subprocess.run([sys.executable, "-c", CLIENT, balancer.url, receiver.url], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        trace_id = result.stdout.strip()
        wait_until(lambda: len(receiver.named("modelport.batch")) >= 2, 15, what="the worker's spans")
        spans = {s["name"]: s for s in receiver.spans if s["trace"] == trace_id}
        assert {s["trace"] for s in receiver.spans} == {trace_id}
        assert spans["modelport.client classify"]["parent"] == spans["app.work"]["id"]
        assert spans["modelport.client classify"]["attributes"]["server.address"] == balancer.url
        request = spans["modelport.request smart"]
        assert request["parent"] == spans["modelport.client classify"]["id"]
        for step in ("cheap", "accurate"):
            assert spans[f"modelport.pipeline.step {step}"]["parent"] == request["id"]
            assert spans[f"modelport.batch {step}"]["parent"] == spans[f"modelport.pipeline.step {step}"]["id"]
    finally:
        receiver.close()
