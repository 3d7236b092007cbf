"""The deployment artefacts in deploy/, each checked by something that runs.

- KServe: `modelport serve` started with exactly the container args of the ServingRuntime, against
  a directory laid out the way KServe's storage initializer lays out /mnt/models, answers Triton's
  own V2 client (health, metadata, infer).
- Dockerfile: no container engine here, so its steps run the same way in a fresh virtual
  environment: install the package, build the default model, start the CMD, pass the HEALTHCHECK.
- systemd units: `systemd-analyze verify`, where it exists.
- Kubernetes autoscaling (KEDA, HPA + prometheus-adapter): no cluster here, so the YAML is parsed and
  every metric its queries read is looked for in a live worker's /metrics.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import tritonclient.http as httpclient
from servers import free_port

DEPLOY = Path(__file__).parent.parent / "deploy"
ROOT = DEPLOY.parent


def start(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env or os.environ.copy())


def wait_live(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(log.read_text())


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_kserve_runtime_args_serve_v2_on_a_storage_initializer_layout(default_bundle, tmp_path, images):
    runtime = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    assert runtime["kind"] == "ClusterServingRuntime"
    assert {"name": "onnx", "version": "1", "autoSelect": False, "priority": 1} in runtime["spec"]["supportedModelFormats"]
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    service = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert service["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    name = service["metadata"]["name"]

    # The storage initializer copies storageUri's content into /mnt/models: here, one bundle.
    mnt_models = tmp_path / "mnt" / "models"
    shutil.copytree(default_bundle, mnt_models)
    port = free_port()
    args = []
    for arg in container["args"]:  # exactly the YAML's args; only the pod's paths and port differ here
        arg = arg.replace("{{.Name}}", name).replace("/mnt/models", str(mnt_models)).replace("8080", str(port))
        args.append(arg.replace("--host=0.0.0.0", "--host=127.0.0.1"))  # tests stay on loopback
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    proc = start([sys.executable, "-m", "modelport", *args], tmp_path / "server.log")
    try:
        wait_live(f"http://127.0.0.1:{port}", proc, tmp_path / "server.log")
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
        metadata = client.get_model_metadata(name)
        assert metadata["name"] == name and metadata["platform"] == "onnx_onnxv1"
        data = np.array([images["espresso"].read_bytes()], dtype=np.object_)
        tensor = httpclient.InferInput("image_bytes", [1], "BYTES")
        tensor.set_data_from_numpy(data, binary_data=True)
        result = client.infer(name, [tensor], outputs=[httpclient.InferRequestedOutput("probabilities", class_count=1)])
        assert result.as_numpy("probabilities")[0][0].decode().endswith(":espresso")
        client.close()
    finally:
        stop(proc)


def dockerfile() -> dict:
    text = (DEPLOY / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)  # continuation lines
    lines = [line.strip() for line in logical.splitlines() if line.strip() and not line.strip().startswith("#")]
    steps: dict[str, list[str]] = {}
    for line in lines:
        word, _, rest = line.partition(" ")
        steps.setdefault(word.upper(), []).append(rest.strip())
    return steps


def see_dependencies(venv: Path) -> None:
    """Let ``venv`` import the dependencies this test run has, wherever they were installed (the
    system interpreter, a user's venv, CI's venv) instead of downloading them again: a .pth file
    naming this interpreter's site-packages. ``--system-site-packages`` would give the *base*
    interpreter's, which inside a user's venv holds none of them. The directories are appended
    after the venv's own, so the package installed into the venv is the one that runs (the
    running interpreter's own .pth files, an editable install's among them, are not read)."""
    paths = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages,) = (venv / "lib").glob("python*/site-packages")
    (site_packages / "dependencies-of-the-test-run.pth").write_text("".join(f"{p}\n" for p in paths))


def test_dockerfile_steps_run_in_a_fresh_venv(model_home, tmp_path):
    steps = dockerfile()
    assert steps["USER"] and steps["USER"][-1] not in ("root", "0")  # runs as a user of its own
    assert steps["EXPOSE"] == ["12480"]
    health = steps["HEALTHCHECK"][0]
    assert "/v2/health/ready" in health
    cmd = json.loads(steps["CMD"][0])
    entrypoint = json.loads(steps["ENTRYPOINT"][0])
    assert entrypoint == ["modelport"] and cmd[:1] == ["serve"] and "0.0.0.0" in cmd

    # The build stage's RUN, the same way: in a fresh venv, install the package and build the model.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    see_dependencies(venv)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    (run,) = steps["RUN"][:1]
    commands = [c.strip() for c in run.split("&&")]
    assert commands[0].startswith("pip install") and commands[-1].endswith("modelport build-default --no-checks")
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "--no-deps", str(ROOT)],
                   check=True, env=env, cwd=tmp_path)
    # The model build itself is the session's (the same code as `build-default`): here the command
    # must exist in the venv and find it built (MODELPORT_HOME as the image sets it).
    home = {**env, "MODELPORT_HOME": str(model_home)}
    flags = commands[-1].split("modelport build-default", 1)[1].split()  # the RUN's own (--no-checks)
    built = subprocess.run([str(bin_dir / "modelport"), "build-default", *flags], env=home, capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr

    # The image's CMD (on loopback, a free port), then its HEALTHCHECK command.
    port = free_port()
    args = [a.replace("0.0.0.0", "127.0.0.1").replace("12480", str(port)) for a in cmd]
    proc = start([str(bin_dir / entrypoint[0]), *args], tmp_path / "server.log", env=home)
    try:
        wait_live(f"http://127.0.0.1:{port}", proc, tmp_path / "server.log")
        check = json.loads(health[health.index("CMD") + 3:].strip())
        check = [part.replace("12480", str(port)) for part in check]
        check[0] = str(bin_dir / check[0])
        assert subprocess.run(check, env=home, timeout=10).returncode == 0
    finally:
        stop(proc)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["modelport-worker@.service", "modelport-balancer.service"])
def test_systemd_units_verify(unit, tmp_path):
    # verify needs an instance for a template, and the programs named in ExecStart to exist.
    name = unit.replace("@.", "@12481.")
    shutil.copy(DEPLOY / "systemd" / unit, tmp_path / name)
    text = (tmp_path / name).read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    program = shlex.split(exec_start.partition("=")[2])[0]
    modelport = shutil.which("modelport")
    assert program == "/usr/local/bin/modelport" and modelport
    (tmp_path / name).write_text(text.replace(program, modelport))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                            capture_output=True, text=True)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if name in line or "modelport" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_kubernetes_autoscaling_reads_metrics_a_worker_exports(cluster):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from modelport.cluster.autoscale import IN_FLIGHT, load_from_metrics

    keda = yaml.safe_load((DEPLOY / "kubernetes" / "keda-scaledobject.yaml").read_text())
    hpa, adapter = yaml.safe_load_all((DEPLOY / "kubernetes" / "hpa.yaml").read_text())
    assert (keda["kind"], hpa["kind"], hpa["apiVersion"]) == ("ScaledObject", "HorizontalPodAutoscaler", "autoscaling/v2")
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]  # the HPA asks for what the adapter serves
    # Both say the same: workers, target per worker, delays.
    assert float(trigger["metadata"]["threshold"]) == float(metric["pods"]["target"]["averageValue"])
    assert (keda["spec"]["minReplicaCount"], keda["spec"]["maxReplicaCount"]) == \
        (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    assert keda["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["spec"]["behavior"]

    # Both read the load `modelport autoscale` measures: the ongoing-requests gauge, summed.
    keda_query = trigger["metadata"]["query"]
    adapter_query = rule["seriesQuery"] + " " + rule["metricsQuery"].replace("<<.Series>>", IN_FLIGHT)
    for query in (keda_query, adapter_query):
        assert set(re.findall(r"\bmodelport_[a-z_]+", query)) == {IN_FLIGHT}, query
    worker = cluster.start_worker()
    text = httpx.get(worker.url + "/metrics").text
    samples = {sample.name: sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples}
    assert IN_FLIGHT in samples
    # Idle, the gauge reads 0: scrapes and health checks are not counted, so an idle fleet reads 0.
    assert samples[IN_FLIGHT] == 0
    assert load_from_metrics(text) == 0
