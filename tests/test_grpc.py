"""gRPC (the Open Inference Protocol, as Triton and KServe serve it) against Triton's own gRPC client,
unchanged: the same models, answers, limits and errors as over HTTP."""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest

import tritonclient.grpc as grpcclient  # in the grpc extra: a missing install fails here, not silently
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import fuzzing
from modelport import samples
from servers import Gate, Server, free_port, make_gate_bundle, metric, wait_until

MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def triton(default_server):
    client = grpcclient.InferenceServerClient(default_server.grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tiny(hardened_server):
    server, weights = hardened_server
    client = grpcclient.InferenceServerClient(server.grpc_address)
    yield client, weights
    client.close()


def images_input(*jpegs: bytes):
    tensor = grpcclient.InferInput("image_bytes", [len(jpegs)], "BYTES")
    tensor.set_data_from_numpy(np.array(jpegs, dtype=np.object_))
    return tensor


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert triton.get_server_metadata().name == "modelport"
    metadata = triton.get_model_metadata(MODEL, as_json=True)
    assert metadata["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": ["-1", "224", "224", "3"]}
    assert {o["name"] for o in metadata["outputs"]} == {"probabilities", "features"}


def test_a_raw_tensor_gets_the_models_own_answer(triton, served_model, images):
    crop = served_model.decode(images["espresso"].read_bytes())[None]
    tensor = grpcclient.InferInput("image", list(crop.shape), "UINT8")
    tensor.set_data_from_numpy(crop)  # raw_input_contents
    result = triton.infer(MODEL, [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    assert np.allclose(result.as_numpy("probabilities"), served_model.predict(crop), atol=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_encoded_images_with_classification_answer_alike_over_http_and_grpc(default_server, images, protocol):
    jpegs = np.array([images["espresso"].read_bytes(), images["cat"].read_bytes()], dtype=np.object_)
    client_module = grpcclient if protocol == "grpc" else httpclient
    address = default_server.grpc_address if protocol == "grpc" else default_server.url.removeprefix("http://")
    client = client_module.InferenceServerClient(address)
    tensor = client_module.InferInput("image_bytes", [2], "BYTES")
    tensor.set_data_from_numpy(jpegs)
    result = client.infer(MODEL, [tensor], outputs=[client_module.InferRequestedOutput("probabilities", class_count=3)])
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3)
    assert top[0][0].decode().split(":")[1:] == ["967", "espresso"]
    assert 281 <= int(top[1][0].decode().split(":")[1]) <= 285  # a cat
    client.close()


def test_typed_contents_and_statistics(tiny):
    client, weights = tiny
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    request = grpcclient.service_pb2.ModelInferRequest(model_name=fuzzing.MODEL)
    tensor = request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())  # typed contents, not raw
    before = client.get_inference_statistics(fuzzing.MODEL).model_stats[0].inference_count
    response = client._client_stub.ModelInfer(request)
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, -1)
    assert np.allclose(logits, x.mean(axis=(2, 3)) @ weights, atol=1e-5)  # the tiny graph: channel means x weights
    after = client.get_inference_statistics(fuzzing.MODEL).model_stats[0].inference_count
    assert after == before + 2


def test_a_stream_answers_each_request_matched_by_id_and_survives_a_bad_one(tiny):
    client, _ = tiny
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    photos = [fuzzing.png(seed) for seed in range(6)]
    for n, photo in enumerate([*photos, b"not an image"]):
        client.async_stream_infer(fuzzing.MODEL, [images_input(photo)], request_id=f"r{n}")
    got = [answers.get(timeout=20) for _ in range(len(photos) + 1)]
    client.stop_stream()
    ids = sorted(r.get_response().id for r, e in got if e is None)
    errors = [e.message() for r, e in got if e is not None]
    assert ids == sorted(f"r{n}" for n in range(len(photos)))
    assert len(errors) == 1 and "cannot decode image" in errors[0]


@pytest.mark.parametrize("call, status, says", [
    (lambda c: c.infer("nope", [images_input(b"x")]), "StatusCode.NOT_FOUND", "unknown model 'nope'"),
    (lambda c: c.infer(fuzzing.MODEL, [grpcclient.InferInput("other", [1], "BYTES")]), "StatusCode.INVALID_ARGUMENT",
     "unknown input"),
    (lambda c: c.infer(fuzzing.MODEL, [images_input(*[b"x"] * 65)]), "StatusCode.RESOURCE_EXHAUSTED", "over the limit"),
    (lambda c: c.infer(fuzzing.MODEL, [images_input(b"not an image")]), "StatusCode.INVALID_ARGUMENT",
     "cannot decode image"),
    (lambda c: c.get_model_repository_index(), "StatusCode.UNAUTHENTICATED", "bearer token"),
    (lambda c: c.get_model_repository_index(headers={"authorization": "Bearer wrong"}), "StatusCode.UNAUTHENTICATED",
     "bearer token"),
])
def test_errors_are_grpc_status_codes_with_the_same_messages_as_http(tiny, call, status, says):
    client, _ = tiny
    with pytest.raises(InferenceServerException) as raised:
        call(client)
    assert raised.value.status() == status and says in raised.value.message()


def test_the_repository_rpcs_need_the_admin_token(tiny):
    client, _ = tiny
    bearer = {"authorization": f"Bearer {fuzzing.ADMIN_TOKEN}"}
    index = client.get_model_repository_index(headers=bearer, as_json=True)
    assert {"name": fuzzing.MODEL, "version": "1", "state": "READY"}.items() <= index["models"][0].items()
    client.load_model(fuzzing.MODEL, headers=bearer)  # already loaded: loading again keeps it serving
    assert client.is_model_ready(fuzzing.MODEL)
    with pytest.raises(InferenceServerException) as raised:
        client.unload_model("nope", headers=bearer)
    assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_a_cat_over_grpc(triton):
    result = triton.infer(MODEL, [images_input(samples.jpeg(samples.photo("chelsea")))],
                          outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=1)])
    assert 281 <= int(result.as_numpy("probabilities")[0][0].decode().split(":")[1]) <= 285


def test_modelports_own_client_speaks_grpc(default_server, hardened_server, images):
    from modelport import AsyncClient, Client
    from modelport.errors import BadInput, NotFound

    url = f"grpc://{default_server.grpc_address}"
    with Client(url) as client:
        assert client.ping()
        assert client.classify(images["espresso"], top_k=3)[0].label == "espresso"
        with pytest.raises(NotFound, match="unknown model"):
            client.infer("nope", [images["cat"].read_bytes()])
    tiny_server, weights = hardened_server
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)

    async def run():
        async with AsyncClient(f"grpc://{tiny_server.grpc_address}", model=fuzzing.MODEL) as client:
            answers = await asyncio.gather(*(client.infer(fuzzing.MODEL, {"image": x[i:i + 1]}) for i in range(3)))
            with pytest.raises(BadInput, match="cannot decode"):
                await client.classify(b"not an image")
            return answers

    answers = asyncio.run(run())
    assert np.allclose(np.concatenate([a["logits"] for a in answers]), x.mean(axis=(2, 3)) @ weights, atol=1e-5)


# -- Triton's asyncio client -------------------------------------------------------------------------

def test_tritons_asyncio_client_health_metadata_and_concurrent_images_with_class_count(default_server, images):
    photos = [images["espresso"].read_bytes(), images["cat"].read_bytes()] * 3

    async def run():
        client = aioclient.InferenceServerClient(default_server.grpc_address)
        try:
            health = [await client.is_server_live(), await client.is_server_ready(), await client.is_model_ready(MODEL)]
            server = await client.get_server_metadata()
            metadata = await client.get_model_metadata(MODEL, as_json=True)

            def ask(n: int, photo: bytes):
                tensor = aioclient.InferInput("image_bytes", [1], "BYTES")
                tensor.set_data_from_numpy(np.array([photo], dtype=np.object_))
                return client.infer(MODEL, [tensor], request_id=f"q{n}",
                                    outputs=[aioclient.InferRequestedOutput("probabilities", class_count=3)])

            results = await asyncio.gather(*(ask(n, photo) for n, photo in enumerate(photos)))
            return health, server, metadata, results
        finally:
            await client.close()

    health, server, metadata, results = asyncio.run(run())
    assert health == [True, True, True] and server.name == "modelport"
    assert metadata["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": ["-1", "224", "224", "3"]}
    for n, result in enumerate(results):
        assert result.get_response().id == f"q{n}"
        top = result.as_numpy("probabilities")
        assert top.shape == (1, 3)
        if n % 2 == 0:
            assert top[0][0].decode().split(":")[1:] == ["967", "espresso"]
        else:
            assert 281 <= int(top[0][0].decode().split(":")[1]) <= 285  # a cat


def test_tritons_asyncio_client_gets_each_concurrent_tensor_its_own_answer_and_errors_as_status(hardened_server):
    server, weights = hardened_server
    x = np.random.default_rng(5).normal(size=(16, 3, 8, 8)).astype(np.float32)  # 16 unique payloads, batched

    async def run():
        client = aioclient.InferenceServerClient(server.grpc_address)
        try:
            def ask(row: np.ndarray):
                tensor = aioclient.InferInput("image", [1, 3, 8, 8], "FP32")
                tensor.set_data_from_numpy(row[None])
                return client.infer(fuzzing.MODEL, [tensor])

            results = await asyncio.gather(*(ask(row) for row in x))
            tensor = aioclient.InferInput("image", [1, 3, 8, 8], "FP32")
            tensor.set_data_from_numpy(x[:1])
            with pytest.raises(InferenceServerException) as raised:
                await client.infer("nope", [tensor])
            return results, raised.value
        finally:
            await client.close()

    results, error = asyncio.run(run())
    logits = np.concatenate([r.as_numpy("logits") for r in results])
    assert np.allclose(logits, x.mean(axis=(2, 3)) @ weights, atol=1e-5)
    assert error.status() == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in error.message()


# -- deadlines and cancellation, with a gate that holds the model ---------------------------------

@pytest.fixture
def gated(tmp_path):
    """A server over the gate model (max_batch_size 1, a queue of 4) with a gRPC port, the gate open,
    and Triton's client of it."""
    bundle = make_gate_bundle(tmp_path / "repo" / "gate" / "1", max_batch_size=1, max_queue_size=4, max_delay_ms=0)
    server = Server(str(tmp_path / "repo"), log=tmp_path / "server.log", grpc_port=free_port()).wait_ready()
    client = grpcclient.InferenceServerClient(server.grpc_address)
    yield server, Gate(bundle), client  # the Gate made after ready: counts requests only
    Gate(bundle).open()
    client.close()
    server.stop()
    assert "Traceback" not in server.log.read_text(), "the server logged a traceback"


def gate_input():
    tensor = grpcclient.InferInput("image", [1, 8, 8, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 8, 8, 3), np.uint8))
    return tensor


def computed(client) -> tuple[int, int]:
    """(inference_count, execution_count) of the gate model, from Triton's statistics call."""
    stats = client.get_inference_statistics("gate", as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_a_call_whose_deadline_passes_in_the_queue_is_deadline_exceeded_and_never_computed(gated):
    server, gate, client = gated
    gate.close()
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(client.infer, "gate", [gate_input()])
        wait_until(lambda: len(gate.batches()) == 1)  # the held request is in the model
        start = time.monotonic()
        late = pool.submit(client.infer, "gate", [gate_input()], client_timeout=0.5)
        wait_until(lambda: metric(server.url, "modelport_queue_depth", model="gate") == 1)  # queued, not refused
        with pytest.raises(InferenceServerException) as raised:
            late.result()
        elapsed = time.monotonic() - start
        assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert 0.4 < elapsed < 3, elapsed
        assert client.is_server_live()
        gate.open()
        assert held.result().as_numpy("logits").shape == (1, 4)
    assert client.infer("gate", [gate_input()]).as_numpy("logits").shape == (1, 4)  # the next one is answered
    assert gate.batches() == [1, 1]  # the held request and the next: the late one never ran
    assert computed(client) == (2, 2)
    # Counted as the call that ran out: 504 (the server's deadline) or 499 (gRPC cancelled it first).
    assert sum(metric(server.url, "modelport_requests_total", model="gate", protocol="grpc", status=s)
               for s in ("504", "499")) == 1
    assert server.proc.poll() is None


def test_a_cancelled_stream_leaves_its_queued_requests_uncomputed(gated):
    server, gate, client = gated
    cancelled, after = queue.Queue(), queue.Queue()
    streamer = grpcclient.InferenceServerClient(server.grpc_address)
    gate.close()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.infer, "gate", [gate_input()])
        wait_until(lambda: len(gate.batches()) == 1)  # the model is busy: the stream's requests queue
        streamer.start_stream(callback=lambda result, error: cancelled.put((result, error)))
        for n in range(3):
            streamer.async_stream_infer("gate", [gate_input()], request_id=f"s{n}")
        wait_until(lambda: metric(server.url, "modelport_queue_depth", model="gate") == 3)
        streamer.stop_stream(cancel_requests=True)
        # A call on the stream's own connection, after the cancel: answered once the server has had it.
        assert streamer.is_server_live()
        gate.open()
        assert held.result().as_numpy("logits").shape == (1, 4)
    streamer.start_stream(callback=lambda result, error: after.put((result, error)))  # new calls are answered
    streamer.async_stream_infer("gate", [gate_input()], request_id="after")
    result, error = after.get(timeout=20)
    streamer.stop_stream()
    streamer.close()
    assert error is None and result.get_response().id == "after"
    assert gate.batches() == [1, 1]  # the held request and the one after: none of the cancelled three ran
    assert computed(client) == (2, 2)
    assert all(result is None for result, _ in list(cancelled.queue))  # no answer came for a cancelled request
    assert server.proc.poll() is None


def test_a_malformed_message_in_a_stream_ends_it_at_once_not_at_the_deadline(hardened_server):
    """A stream whose second message is not a ModelInferRequest: the request before it is answered,
    then the stream goes on (an in-stream error) or ends with INVALID_ARGUMENT, right away."""
    server, _ = hardened_server
    good = grpcclient.service_pb2.ModelInferRequest(model_name=fuzzing.MODEL, id="r0")
    good.inputs.add(name="image", datatype="FP32", shape=[1, 3, 8, 8])
    good.raw_input_contents.append(bytes(4 * 3 * 8 * 8))
    with grpc.insecure_channel(server.grpc_address) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
                                       response_deserializer=grpcclient.service_pb2.ModelStreamInferResponse.FromString)
        start = time.monotonic()
        after = grpcclient.service_pb2.ModelInferRequest()
        after.CopyFrom(good)
        after.id = "r2"
        call = stream(iter([good.SerializeToString(), b"\xff\xff", after.SerializeToString()]), timeout=5)
        answers, status = [], "OK"
        try:
            answers.extend(call)
        except grpc.RpcError as exc:
            status = exc.code().name
        elapsed = time.monotonic() - start
    assert status in ("OK", "INVALID_ARGUMENT") and elapsed < 2.5, (status, elapsed)
    assert [a for a in answers if a.infer_response.id == "r0" and not a.error_message], answers  # out of order
    tiny_client = grpcclient.InferenceServerClient(server.grpc_address)
    assert tiny_client.is_model_ready(fuzzing.MODEL)
    tiny_client.close()


def test_a_callers_made_up_versions_never_become_metric_labels(hardened_server):
    server, _ = hardened_server
    client = grpcclient.InferenceServerClient(server.grpc_address)
    for i in range(5):
        with pytest.raises(InferenceServerException):
            client.infer(fuzzing.MODEL, [images_input(fuzzing.png(i))], model_version=f"made-up-{i}")
    client.close()
    text = httpx.get(server.url + "/metrics").text
    assert "made-up" not in text
    assert 'protocol="grpc"' in text  # the calls were counted, with a version the server knows ("-")


# -- the transport (HTTP/2 and gRPC's framing, server/grpc_transport.py) ----------------------------

def test_compressed_calls_are_answered_and_unknown_methods_are_unimplemented(hardened_server):
    server, _ = hardened_server
    request = grpcclient.service_pb2.ModelInferRequest(model_name=fuzzing.MODEL, id="z")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(bytes(4 * 3 * 8 * 8))
    answer = grpcclient.service_pb2.ModelInferResponse.FromString
    for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        with grpc.insecure_channel(server.grpc_address, compression=compression) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                        response_deserializer=answer)
            assert infer(request.SerializeToString(), timeout=30).outputs[0].shape == [1, 4]
            stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
                                           response_deserializer=grpcclient.service_pb2.ModelStreamInferResponse.FromString)
            answers = list(stream(iter([request.SerializeToString()] * 3), timeout=30))
            assert [a.infer_response.id for a in answers if not a.error_message] == ["z"] * 3
    with grpc.insecure_channel(server.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary("/inference.GRPCInferenceService/Nope")(b"", timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_what_is_not_grpc_on_the_grpc_port_is_refused_and_the_port_goes_on(hardened_server):
    """HTTP/1.1, a broken HTTP/2 connection and HTTP/2 that is not gRPC: each refused on its own
    connection; calls on others are answered and the server logs no traceback."""
    import socket

    server, _ = hardened_server
    host, port = server.grpc_address.rsplit(":", 1)
    log_from = len(server.log.read_text())
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", preface + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" * 3,
                    preface + bytes(range(256)) * 4):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(garbage)
            received = b""
            while chunk := sock.recv(65536):  # the server closes it (after a GOAWAY)
                received += chunk
    with httpx.Client(http1=False, http2=True) as h2client:  # HTTP/2 with prior knowledge, not gRPC
        answer = h2client.post(f"http://{server.grpc_address}/inference.GRPCInferenceService/ServerLive",
                               content=b"{}", headers={"content-type": "application/json"})
        assert answer.status_code == 415
    client = grpcclient.InferenceServerClient(server.grpc_address)
    assert client.is_server_live() and client.is_model_ready(fuzzing.MODEL)
    client.close()
    assert "Traceback" not in server.log.read_text()[log_from:]


def test_a_call_in_flight_when_the_server_stops_is_answered(gated):
    server, gate, client = gated
    gate.close()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.infer, "gate", [gate_input()])
        wait_until(lambda: len(gate.batches()) == 1)
        server.proc.send_signal(signal.SIGTERM)  # GOAWAY: no new calls; this one goes on
        time.sleep(0.5)
        assert server.proc.poll() is None
        gate.open()
        assert held.result(timeout=20).as_numpy("logits").shape == (1, 4)
    assert server.proc.wait(timeout=30) == 0


def test_a_config_files_server_table_turns_grpc_on_and_the_command_line_wins(tmp_path):
    make_gate_bundle(tmp_path / "repo" / "gate" / "1", max_batch_size=8)
    grpc_port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nrepository = "{tmp_path / "repo"}"\ngrpc-port = {grpc_port}\nport = 1\n'
                      'max_batch_size = 3\n')
    server = Server("--config", str(config), log=tmp_path / "server.log").wait_ready()  # --port beats port = 1
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_model_ready("gate")
        client.close()
        assert metric(server.url, "modelport_batch_size_limit", model="gate") == 3  # the bundle says 8
    finally:
        server.stop()
    config.write_text("[server]\ngrpc_prt = 8001\n")
    wrong = subprocess.run([sys.executable, "-m", "modelport", "serve", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "no setting 'grpc_prt'" in wrong.stderr and "grpc_port" in wrong.stderr


def test_slow_grpc_clients_are_cut_off_and_others_are_served(tmp_path):
    """A connection that starts no call, a call whose message never completes (read timeout) and
    one whose client never opens its window for the answer (write timeout) are ended; a call on
    another connection meanwhile is answered."""
    import socket

    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    make_gate_bundle(tmp_path / "repo" / "gate" / "1", max_batch_size=1)
    grpc_port = free_port()
    server = Server(str(tmp_path / "repo"), "--read-timeout-s", "1", "--write-timeout-s", "1",
                    log=tmp_path / "server.log", grpc_port=grpc_port).wait_ready()
    call = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
            (b":path", b"/inference.GRPCInferenceService/ServerLive"), (b"te", b"trailers"),
            (b"content-type", b"application/grpc")]

    def connect(window: int | None = None):
        sock = socket.create_connection(("127.0.0.1", grpc_port), timeout=10)
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        h2c.initiate_connection()
        if window is not None:
            h2c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        return sock, h2c

    def reset_after(sock, h2c, start: float) -> float | None:
        while data := sock.recv(65536):
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.StreamReset):
                    return time.monotonic() - start
            sock.sendall(h2c.data_to_send())
        return None

    try:
        silent = socket.create_connection(("127.0.0.1", grpc_port), timeout=10)
        slow, slow_h2 = connect()
        slow_h2.send_headers(1, call)
        slow_h2.send_data(1, b"\x00\x00\x00\x00\x10")  # a 16-byte message that never comes
        slow.sendall(slow_h2.data_to_send())
        deaf, deaf_h2 = connect(window=0)  # a whole call, but no room for its answer, ever
        deaf_h2.send_headers(1, call)
        deaf_h2.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
        deaf.sendall(deaf_h2.data_to_send())
        start = time.monotonic()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_live()  # served meanwhile
        client.close()
        for sock, h2c in ((slow, slow_h2), (deaf, deaf_h2)):
            reset = reset_after(sock, h2c, start)
            assert reset is not None and 0.8 < reset < 5, reset
        while silent.recv(65536):  # GOAWAY, then closed
            pass
        assert time.monotonic() - start < 5
        silent.close(), slow.close(), deaf.close()
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
