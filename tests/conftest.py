"""Shared fixtures: the real default model (built once per run) and tiny real ONNX bundles."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from cluster import TTL_S, BalancerProcess, EtcdServer, registry
from modelport import samples
from modelport.repository.bundle import write_config
from modelport.server.cluster import worker_id
from servers import Server, stop_all, wait_until


@pytest.fixture(scope="session")
def model_home(tmp_path_factory) -> Path:
    """A MODELPORT_HOME shared by the whole run, also by the subprocesses the tests start."""
    home = Path(os.environ.get("MODELPORT_TEST_HOME") or tmp_path_factory.mktemp("home"))
    os.environ["MODELPORT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def default_bundle(model_home) -> Path:
    from modelport.packaged import default_model

    return default_model.ensure_default_model()


@pytest.fixture(scope="session")
def default_model(default_bundle):
    """The reference answers: ONNX Runtime at fp32 (a server's `auto` may run bf16 where it was checked)."""
    from modelport.engine.model import Model

    return Model.load(default_bundle, precision="fp32")


@pytest.fixture(scope="session")
def served_model(default_bundle):
    """The default model as `modelport serve` loads it (`auto`: the fastest precision checked at
    build on this CPU): the reference for what the default server answers."""
    from modelport.engine.model import Model

    model = Model.load(default_bundle, concurrent_batches=None)
    yield model
    model.close()


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("images")
    cat, espresso = samples.write_samples(directory)
    return {"cat": cat, "espresso": espresso}


def tiny_onnx(path: Path, *, classes: int = 4, size: int = 8, dtype: str = "float32", layout: str = "NCHW",
              seed: int = 0) -> np.ndarray:
    """A real ONNX graph: mean pixel per channel, times a (3, classes) matrix -> logits.

    Returns the matrix so a test can compute the expected answer itself.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(seed).normal(size=(3, classes)).astype(np.float32)
    elem = {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8}[dtype]
    shape = ["N", 3, size, size] if layout == "NCHW" else ["N", size, size, 3]
    axes = [2, 3] if layout == "NCHW" else [1, 2]
    nodes = []
    x = "image"
    if dtype != "float32":
        nodes.append(helper.make_node("Cast", [x], ["image_f"], to=TensorProto.FLOAT))
        x = "image_f"
    nodes += [
        helper.make_node("ReduceMean", [x, "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "weights"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", elem, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(weights, "weights"),
                     numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return weights


def make_tiny_bundle(directory: Path, *, classes: int = 4, size: int = 8, dtype: str = "float32",
                     layout: str = "NCHW", labels: list[str] | None = None, seed: int = 0, **overrides) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tiny_onnx(directory / "model.onnx", classes=classes, size=size, dtype=dtype, layout=layout, seed=seed)
    labels = labels if labels is not None else [f"class{i}" for i in range(classes)]
    (directory / "labels.txt").write_text("\n".join(labels) + "\n")
    config = {
        "format": 1, "runtime": "onnx", "model_file": "model.onnx",
        "input": {"height": size, "width": size, "resize_shorter": 0, "layout": layout, "dtype": dtype,
                  "mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5]},
        "output": {"name": "logits", "kind": "logits"},
        "serving": {"top_k": 3},
    }
    for key, value in overrides.items():
        table, _, field = key.partition("__")
        if field:
            config[table][field] = value
        else:
            config[table] = value
    write_config(directory, config)
    return directory


@pytest.fixture(scope="session")
def default_server(default_bundle, tmp_path_factory):
    """One real server with the default model for the protocol tests."""
    from servers import free_port

    server = Server(log=tmp_path_factory.mktemp("logs") / "default.log", zmq_port=free_port(),
                    grpc_port=free_port()).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hardened_server(tmp_path_factory):
    """The tiny float model (max_batch_size 4, at most 64 images a request) over HTTP and ZeroMQ,
    for the fuzz and hardening tests. Yields the server and the graph's weights."""
    import fuzzing
    from servers import free_port

    root = tmp_path_factory.mktemp("hardened")
    make_tiny_bundle(root / "repo" / fuzzing.MODEL / "1", size=8, serving={"top_k": 3, "max_batch_size": 4})
    server = Server(str(root / "repo"), "--max-images-per-request", "64", "--admin-token", fuzzing.ADMIN_TOKEN,
                    "--max-queue-size", "1000", log=root / "server.log", zmq_port=free_port(),
                    grpc_port=free_port()).wait_ready()
    yield server, tiny_onnx(root / "w.onnx")
    server.stop()
    assert "Traceback" not in server.log.read_text(), "the server logged a traceback"


# -- the cluster: one real etcd for the session, a fresh cluster name per test ------------------------

@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    server = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def cluster_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("cluster-repo")
    make_tiny_bundle(repo / "tiny" / "1", size=8)
    return repo


@pytest.fixture
def cluster(etcd_server, cluster_repo, tmp_path, request):
    """A fresh cluster name in the shared etcd; starts workers and a balancer on demand; stops
    everything it started at the end."""

    class Cluster:
        url = etcd_server.url(re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60])

        def __init__(self) -> None:
            self.workers: list[Server] = []
            self.balancer: BalancerProcess | None = None

        def start_worker(self, *extra: str, wait: bool = True, repo: Path | None = None) -> Server:
            worker = Server(str(repo or cluster_repo), "--cluster", self.url, "--drain-s", "1", "--lease-ttl-s",
                            str(TTL_S), *extra, log=tmp_path / f"worker{len(self.workers)}.log")
            self.workers.append(worker)
            if wait:
                worker.wait_ready()
                wait_until(lambda: worker_id(worker.port) in self.members(), 10, what="registration")
            return worker

        def start_balancer(self) -> BalancerProcess:
            self.balancer = BalancerProcess(self.url, tmp_path / "balancer.log")
            return self.balancer

        def members(self) -> dict:
            return registry(self.url)[0]

    c = Cluster()
    yield c
    stop_all(c.workers)
    if c.balancer is not None:
        c.balancer.stop()
