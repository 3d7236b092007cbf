"""modelport import (modelport/importer/, issue 25): real models from other frameworks become bundles.

Small real models are built here, once per module, in each framework the importer takes: a Keras
CNN saved as .keras, .h5 and a SavedModel, its TFLite conversion, a TF1 frozen graph shaped like
the retrain guide's ``output_graph.pb`` (it decodes the JPEG itself), a keras.applications
MobileNetV2, a PyTorch module, a TorchScript file and an ONNX file. Their last layer gets random
weights scaled on real photos so that the top-1 moves from photo to photo and is seldom a near-tie:
a comparison of top-1s then means something. Some are imported with the CLI, some with
``import_model``; one real server serves the repository, and over HTTP each imported model must
answer the top-1 its source gives in its own framework, on its own preprocessing of the same photo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelport import samples
from modelport.engine import imaging
from modelport.engine.predictions import softmax
from modelport.errors import BadInput
from modelport.importer import ImportRejected, import_model
from modelport.repository.bundle import ImageInput, load_bundle
from servers import Server

LABELS = ("daisy", "dandelion", "roses", "sunflowers", "tulips")  # the retrain guide's flowers
SIZE = 32  # the small models' input
GUIDE_SIZE = 299  # the guide's Inception v3 input
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
ONNX_MEAN, ONNX_STD = (120.0, 115.0, 100.0), (60.0, 60.0, 60.0)
# model name -> what the bundle's metadata says it came from
KINDS = {"keras": "keras", "h5": "keras", "savedmodel": "savedmodel", "tflite": "tflite", "guide": "graphdef",
         "mobilenet": "keras", "torch-module": "torch-module", "torchscript": "torchscript", "onnx": "onnx"}
MIN_AGREEMENT = 0.9  # of the test photos: a decode difference may flip the odd close call


def modelport_import(*args, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelport", "import", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout_s)


def said(result: subprocess.CompletedProcess) -> str:
    """What the command told the user on stderr, its line wrapping undone."""
    return " ".join(result.stderr.split())


def crops(photos: list[bytes], size: int, resize_shorter: int) -> np.ndarray:
    """The textbook decode of the photos, as a bundle with this geometry asks for (uint8 NHWC)."""
    spec = ImageInput(height=size, width=size, resize_shorter=resize_shorter)
    return np.stack([imaging.reference(data, spec) for data in photos])


def bundle_crops(bundle_dir: Path, photos: list[bytes], decode=imaging.reference) -> np.ndarray:
    """The photos cut as the bundle's modelport.toml says: by the textbook pipeline, or modelport's own."""
    spec = load_bundle(bundle_dir).input
    return np.stack([decode(data, spec) for data in photos])


def calibrated_head(features: np.ndarray, seed: int, spread: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Weights (F, 5) and bias (5,) for a last layer: random, each class's logit centred and scaled to
    ``spread`` over these photos' features, so the top-1 changes with the photo and is rarely a tie."""
    weights = np.random.default_rng(seed).normal(size=(features.shape[1], len(LABELS)))
    logits = features.astype(np.float64) @ weights
    mean, std = logits.mean(0), logits.std(0) + 1e-9
    return (weights / std * spread).astype(np.float32), (-mean / std * spread).astype(np.float32)


# -- the sources, built once -----------------------------------------------------------------------

def keras_cnn(photos: list[bytes]):
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu")(image)
    x = keras.layers.MaxPooling2D(2)(x)
    features = keras.layers.Flatten()(x)
    head = keras.layers.Dense(len(LABELS), activation="softmax", name="probabilities")
    model = keras.Model(image, head(features), name="flowers_cnn")
    unit = crops(photos, SIZE, round(SIZE / 0.875)).astype(np.float32) / 255
    head.set_weights(calibrated_head(np.asarray(keras.Model(image, features)(unit)), seed=1))
    return model


def mobilenet(photos: list[bytes]):
    """keras.applications MobileNetV2 with random weights (nothing downloaded), made to answer something.

    At initialisation its batch norms assume unit variance and the activations vanish (pooled
    features ~1e-13: the output is rounding noise). One pass in training mode with momentum 0 sets
    each batch norm's statistics to what it sees on the photos, as training would; then the head."""
    import keras

    keras.utils.set_random_seed(2)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=len(LABELS))
    inputs = keras.applications.mobilenet_v2.preprocess_input(crops(photos, 64, 73).astype(np.float32))
    norms = {layer: layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}
    for layer in norms:
        layer.momentum = 0.0
    model(inputs, training=True)
    for layer, momentum in norms.items():
        layer.momentum = momentum
    pooled = keras.Model(model.inputs, model.layers[-2].output)
    model.layers[-1].set_weights(calibrated_head(np.asarray(pooled(inputs)), seed=3))
    return model


def guide_graph(head=None):
    """A TF1 graph with the retrain guide's tensor names: JPEG bytes -> decode -> resize -> (x-128)/128
    -> conv -> pool_3/_reshape -> the bottleneck PlaceholderWithDefault -> MatMul -> final_result."""
    import tensorflow as tf

    tf1 = tf.compat.v1
    rng = np.random.default_rng(4)
    weights, bias = head if head is not None else (np.zeros((16, len(LABELS)), np.float32), np.zeros(len(LABELS)))
    graph = tf.Graph()
    with graph.as_default():
        contents = tf1.placeholder(tf.string, name="DecodeJpeg/contents")
        x = tf.io.decode_jpeg(contents, channels=3, name="DecodeJpeg")
        x = tf.expand_dims(tf.cast(x, tf.float32, name="Cast"), 0, name="ExpandDims")
        x = tf1.image.resize_bilinear(x, [GUIDE_SIZE, GUIDE_SIZE], name="ResizeBilinear")
        x = tf.multiply(tf.subtract(x, 128.0, name="Sub"), 1.0 / 128, name="Mul")
        kernel = (rng.normal(size=(3, 3, 3, 16)) * 0.3).astype(np.float32)
        y = tf.nn.relu(tf.nn.conv2d(x, kernel, 2, "VALID"))
        pool = tf.reshape(tf.reduce_mean(y, [1, 2]), [1, 16], name="pool_3/_reshape")
        bottleneck = tf1.placeholder_with_default(pool, [1, 16], name="input/BottleneckInputPlaceholder")
        logits = tf.add(tf.matmul(bottleneck, weights.astype(np.float32), name="final_training_ops/Wx_plus_b/MatMul"),
                        bias.astype(np.float32), name="final_training_ops/Wx_plus_b/add")
        tf.nn.softmax(logits, name="final_result")
    return graph


def run_guide(graph, photos: list[bytes], tensor: str = "final_result:0") -> np.ndarray:
    import tensorflow as tf

    with tf.compat.v1.Session(graph=graph) as session:
        return np.concatenate([session.run(tensor, {"DecodeJpeg/contents:0": data}) for data in photos])


def torch_net(photos: list[bytes], seed: int, normalise, channels_last: bool = False):
    import torch

    class ChannelsLast(torch.nn.Module):
        """Takes NHWC, as a graph exported from a TF-minded pipeline does."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 15 * 15, len(LABELS))).eval()
    batch = torch.from_numpy(normalise(crops(photos, SIZE, round(SIZE / 0.875))).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        weights, bias = calibrated_head(net[:-1](batch).numpy(), seed=seed + 1)
        net[-1].weight.copy_(torch.from_numpy(weights.T.copy()))
        net[-1].bias.copy_(torch.from_numpy(bias))
    return ChannelsLast(net).eval() if channels_last else net


def unit(batch: np.ndarray) -> np.ndarray:
    return batch.astype(np.float32) / 255


def torchvision(batch: np.ndarray) -> np.ndarray:
    return ((batch.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def onnx_normalise(batch: np.ndarray) -> np.ndarray:
    return ((batch.astype(np.float32) - np.array(ONNX_MEAN, np.float32)) / np.array(ONNX_STD, np.float32))


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """16 real photos of every kind the samples carry (colour and grey, 200-640 px)."""
    return [samples.jpeg(samples.photo("chelsea")), *samples.photo_set(15, seed=5)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, photos):
    """Every source model, written as its framework writes it; and each source run in its own framework:
    (JPEG photos, their uint8 crops as the bundle cuts them) -> scores."""
    import keras
    import tensorflow as tf
    import torch

    work = tmp_path_factory.mktemp("sources")
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (work / "four-labels.txt").write_text("\n".join(LABELS[:4]) + "\n")

    cnn = keras_cnn(photos)
    cnn.save(work / "flowers.keras")
    cnn.save(work / "flowers.h5")
    cnn.export(str(work / "flowers_savedmodel"), verbose=False)
    (work / "flowers.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(cnn).convert())
    net = mobilenet(photos)
    net.save(work / "mobilenet.keras")

    features = run_guide(guide_graph(), photos, "pool_3/_reshape:0")
    graph = guide_graph(calibrated_head(features, seed=7, spread=3.0))
    (work / "output_graph.pb").write_bytes(graph.as_graph_def().SerializeToString())

    module = torch_net(photos, seed=10, normalise=torchvision)
    torch.jit.save(torch.jit.script(torch_net(photos, seed=20, normalise=torchvision)), str(work / "scripted.pt"))
    nhwc = torch_net(photos, seed=30, normalise=onnx_normalise, channels_last=True)
    torch.onnx.export(nhwc, (torch.zeros(1, SIZE, SIZE, 3),), str(work / "flowers.onnx"), input_names=["pixels"],
                      output_names=["logits"], dynamic_axes={"pixels": {0: "n"}, "logits": {0: "n"}}, opset_version=17,
                      dynamo=False)

    def keras_file(path):
        model = keras.models.load_model(path, compile=False)
        return lambda photos, pixels: np.asarray(model(unit(pixels)))

    def saved_model(photos, pixels):
        signature = tf.saved_model.load(str(work / "flowers_savedmodel")).signatures["serving_default"]
        (name, _), = signature.structured_input_signature[1].items()
        (out,) = signature(**{name: tf.constant(unit(pixels))}).values()
        return out.numpy()

    def tflite(photos, pixels):
        interpreter = tf.lite.Interpreter(model_path=str(work / "flowers.tflite"))
        interpreter.allocate_tensors()
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
        rows = []
        for row in unit(pixels):
            interpreter.set_tensor(inp["index"], row[None])
            interpreter.invoke()
            rows.append(interpreter.get_tensor(out["index"])[0])
        return np.stack(rows)

    def keras_application(photos, pixels):
        model = keras.models.load_model(work / "mobilenet.keras", compile=False)
        return np.asarray(model(keras.applications.mobilenet_v2.preprocess_input(pixels.astype(np.float32))))

    def torch_source(load, normalise):
        def run(photos, pixels):
            with torch.no_grad():
                return load()(torch.from_numpy(normalise(pixels).transpose(0, 3, 1, 2).copy())).numpy()
        return run

    def onnx_source(photos, pixels):
        import onnxruntime

        session = onnxruntime.InferenceSession(str(work / "flowers.onnx"), providers=["CPUExecutionProvider"])
        return session.run(None, {"pixels": onnx_normalise(pixels)})[0]

    guide, graph_def = tf.Graph(), tf.compat.v1.GraphDef()
    graph_def.ParseFromString((work / "output_graph.pb").read_bytes())
    with guide.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    sources = {
        "keras": keras_file(work / "flowers.keras"), "h5": keras_file(work / "flowers.h5"),
        "savedmodel": saved_model, "tflite": tflite, "mobilenet": keras_application,
        "guide": lambda photos, pixels: run_guide(guide, photos),  # from the JPEG bytes: the whole graph
        "torch-module": torch_source(lambda: module, torchvision),
        "torchscript": torch_source(lambda: torch.jit.load(str(work / "scripted.pt")), torchvision),
        "onnx": onnx_source,
    }
    return work, module, sources


@pytest.fixture(scope="module")
def imported(built, tmp_path_factory):
    """Every source imported into one repository: through the CLI (the guide's graph, TorchScript,
    ONNX) and through ``import_model`` (the rest). Returns the repository and the CLI's JSON answers."""
    import torch

    work, module, _ = built
    repo = tmp_path_factory.mktemp("repo")
    labels = work / "labels.txt"
    answers = {}
    for name, args in {
        "guide": [work / "output_graph.pb", "--input", "Mul:0", "--output-tensor", "final_result:0",
                  "--preprocess", "inception"],
        "torchscript": [work / "scripted.pt", "--image-size", SIZE, "--preprocess", "torchvision"],
        "onnx": [work / "flowers.onnx", "--mean", *ONNX_MEAN, "--std", *ONNX_STD],
    }.items():
        result = modelport_import(*args, "--labels", labels, "--name", name, "--output", repo, "--json")
        assert result.returncode == 0, result.stderr
        answers[name] = json.loads(result.stdout)
    for name, source, options in (
        ("keras", work / "flowers.keras", {"preprocess": "unit"}),
        ("h5", work / "flowers.h5", {"preprocess": "unit"}),
        ("savedmodel", work / "flowers_savedmodel", {"preprocess": "unit"}),
        ("tflite", work / "flowers.tflite", {"preprocess": "unit"}),
        ("mobilenet", work / "mobilenet.keras", {}),  # keras.applications: the preset is read from the source
        ("torch-module", module, {"preprocess": "torchvision", "example_input": torch.zeros(1, 3, SIZE, SIZE)}),
    ):
        result = import_model(source, labels=labels, name=name, output=repo, **options)
        assert result.version == 1 and result.report.passed
    return repo, answers


@pytest.fixture(scope="module")
def server(imported, tmp_path_factory):
    repo, _ = imported
    server = Server(str(repo), log=tmp_path_factory.mktemp("logs") / "server.log").wait_ready()
    yield server
    server.stop()
    assert "Traceback" not in server.log.read_text(), "the server logged a traceback"


def versions(model_dir: Path) -> list[str]:
    """Every entry of a model's directory: the versions, and any staging directory left behind."""
    return sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else []


# -- the imported models answer as their sources ---------------------------------------------------

@pytest.mark.parametrize("name", list(KINDS))
def test_served_import_answers_the_top1_of_its_source(name, built, imported, server, photos):
    _, _, sources = built
    repo, _ = imported
    # The source on the textbook decode of the photos; MobileNetV2 on modelport's own decode: a deep
    # net with random weights flips its top-1 on a decode difference of 0.05 grey levels (4 in 48).
    decode = imaging.decode if name == "mobilenet" else imaging.reference
    scores = sources[name](photos, bundle_crops(repo / name / "1", photos, decode))
    expected = [LABELS[i] for i in scores.argmax(1)]
    # A meaningful comparison: the source's top-1 moves from photo to photo, and it is mostly sure.
    assert len(set(expected)) > 1, f"{name}: the source gives {expected[0]} for every photo"
    probabilities = scores if np.allclose(scores.sum(1), 1, atol=1e-3) else softmax(scores)
    assert probabilities.max(1).mean() > 0.5, f"{name}: near-uniform answers {probabilities.max(1)}"
    served = []
    for data in photos:
        response = httpx.post(server.url + f"/?model={name}&k=1", files={"data": data}, timeout=30)
        assert response.status_code == 200, response.text
        served.append(response.json()[0][0])
    agree, count = sum(a == b for a, b in zip(served, expected)), len(photos)
    assert agree >= MIN_AGREEMENT * count, f"{name}: {agree}/{count} top-1 as the source: {served} vs {expected}"


@pytest.mark.parametrize("name", list(KINDS))
def test_bundle_keeps_the_report_and_names_its_source(name, imported):
    repo, answers = imported
    bundle = repo / name / "1"
    report = json.loads((bundle / "import-report.json").read_text())
    assert report["passed"] and report["top1_agreement"] >= 0.98 and report["images"] >= 16
    metadata = tomllib.loads((bundle / "modelport.toml").read_text())["metadata"]
    assert metadata["source_kind"] == KINDS[name]
    assert "passed" in metadata["check"]
    assert load_bundle(bundle).labels == LABELS
    if name in answers:  # the CLI's --json answer is the stored report, with where it went
        assert answers[name]["bundle"] == str(bundle) and answers[name]["version"] == 1
        assert answers[name]["top1_agreement"] == report["top1_agreement"]


def test_the_guide_graph_is_checked_against_its_own_decode(imported):
    repo, _ = imported
    report = json.loads((repo / "guide" / "1" / "import-report.json").read_text())
    assert "the graph's own decode" in report["compared"]
    assert report["input_grey_levels"] < 4  # TF1's resize against modelport's, at 299 px
    config = load_bundle(repo / "guide" / "1").input
    assert (config.height, config.resize_shorter, config.dtype) == (GUIDE_SIZE, 0, "float32")
    assert config.mean == (128.0, 128.0, 128.0) and config.std == (128.0, 128.0, 128.0)


# -- mistakes are caught, and nothing is written ---------------------------------------------------

def test_wrong_preprocessing_flag_is_rejected_with_the_report(built, imported):
    """The guide's graph does (x - 128) / 128 itself: --preprocess torchvision must fail the check."""
    work, _, _ = built
    repo, _ = imported
    result = modelport_import(work / "output_graph.pb", "--input", "Mul:0", "--output-tensor", "final_result:0",
                              "--preprocess", "torchvision", "--labels", work / "labels.txt", "--name", "guide",
                              "--output", repo, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing written" in said(result) and "grey levels" in said(result) and "FAILED" in said(result)
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)  # --json: the failed report itself
    assert not report["passed"] and report["input_grey_levels"] > 16 and "preprocessing" in report["reason"]
    assert versions(repo / "guide") == ["1"]  # no version 2, no .import-* staging left


def test_keras_application_preset_comes_from_the_source(built, imported):
    work, _, _ = built
    repo, _ = imported
    metadata = tomllib.loads((repo / "mobilenet" / "1" / "modelport.toml").read_text())["metadata"]
    assert (metadata["preprocessing"], metadata["preprocessing_from"]) == ("keras-mobilenet", "the source")
    assert load_bundle(repo / "mobilenet" / "1").input.mean == (127.5, 127.5, 127.5)
    with pytest.raises(ImportRejected, match="top-1 agreement") as rejected:
        import_model(work / "mobilenet.keras", labels=work / "labels.txt", name="mobilenet", output=repo,
                     preprocess="caffe")
    assert not rejected.value.report.passed
    assert versions(repo / "mobilenet") == ["1"]


def test_unsupported_operator_is_named_with_where_to_cut(built, tmp_path):
    """Without --input the conversion reaches DecodeJpeg, which ONNX has no operator for."""
    work, _, _ = built
    result = modelport_import(work / "output_graph.pb", "--output-tensor", "final_result:0", "--preprocess",
                              "inception", "--labels", work / "labels.txt", "--output", tmp_path / "repo")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "operator DecodeJpeg" in said(result) and "--input Mul:0" in said(result), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "repo").exists()


def test_labels_must_match_the_output_size(built, tmp_path):
    work, _, _ = built
    result = modelport_import(work / "flowers.onnx", "--labels", work / "four-labels.txt", "--preprocess", "unit",
                              "--output", tmp_path / "repo")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "has 4 labels; the model's output has 5 classes" in said(result) and "Traceback" not in result.stderr
    assert not (tmp_path / "repo").exists()
    with pytest.raises(BadInput, match="4 labels; the model's output has 5 classes"):
        import_model(work / "flowers.onnx", labels=work / "four-labels.txt", preprocess="unit", output=tmp_path / "r2")
    assert not (tmp_path / "r2").exists()
