"""Issue 25's figure: `modelport import` of a Keras MobileNetV2 (224 px, 1000 classes), checked, end to end.

    python benchmarks/import_model.py

The sources are built here, nothing is downloaded: ``keras.applications.MobileNetV2(weights=None)``
saved as .keras, and a frozen graph like the retrain guide's ``output_graph.pb`` around a
``keras.applications.InceptionV3(weights=None)`` body at 299 px (JPEG bytes -> DecodeJpeg -> resize
-> (x - 128) / 128 as ``Mul`` -> Inception v3 -> ``pool_3/_reshape`` [1, 2048] -> the bottleneck
``PlaceholderWithDefault`` -> a 5-class head -> ``final_result``). Random weights would leave the
activations vanishing (the output is then rounding noise, and the check compares nothing): one pass
in training mode on a few photos sets every batch norm's statistics first, as training would. The
work of an import does not depend on the weights' values.

Figures, each timed in this run:
- end to end: ``modelport import model.keras`` in a fresh process (Python and TensorFlow start-up,
  load, conversion with tf2onnx, the check on 32 photos, writing the bundle), as a ratio to the
  60 s bar; beside it, the start-up floor (``python -c "import tensorflow, tf2onnx"``) and the
  report's check times (``source_s``: the source in Keras, ``bundle_s``: decode and ONNX Runtime);
- the conversion alone: ``modelport.importer.tensorflow.keras`` in this process, TensorFlow loaded;
- the guide-like graph at 299 px, imported the way the guide's users would
  (``--input Mul:0 --output-tensor final_result:0 --preprocess inception``), end to end. The
  graph decodes and resizes the JPEG itself, and TF1's ResizeBilinear (no antialiasing) differs from
  modelport's resize by about 2 grey levels on average; the check's outcome is printed beside the
  time, which is the whole import's either way (a rejected import only skips the final rename).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from engine import FLAGS, cpu_flags  # noqa: E402

from modelport import samples  # noqa: E402
from modelport.engine import imaging  # noqa: E402
from modelport.repository.bundle import ImageInput  # noqa: E402

BAR_S = 60.0
GUIDE_SIZE = 299
FLOWERS = ("daisy", "dandelion", "roses", "sunflowers", "tulips")


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - start, result


def import_cli(*args) -> tuple[float, dict]:
    seconds, result = timed([sys.executable, "-m", "modelport", "import", *map(str, args), "--json"])
    if result.returncode not in (0, 1) or not result.stdout.strip():
        raise SystemExit(f"modelport import failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, json.loads(result.stdout)


def crops(photos: list[bytes], size: int, whole_image: bool = False) -> np.ndarray:
    spec = ImageInput(height=size, width=size, resize_shorter=0 if whole_image else round(size / 0.875))
    return np.stack([imaging.reference(data, spec) for data in photos]).astype(np.float32)


def set_batch_norms(model, inputs: np.ndarray) -> None:
    """Every batch norm's moving statistics := what it sees on ``inputs`` (one training-mode pass)."""
    import keras

    norms = {layer: layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}
    for layer in norms:
        layer.momentum = 0.0
    model(inputs, training=True)
    for layer, momentum in norms.items():
        layer.momentum = momentum


def mobilenet(path: Path, photos: list[bytes]) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None)  # 224 px, 1000 classes
    set_batch_norms(model, keras.applications.mobilenet_v2.preprocess_input(crops(photos, 224)))
    model.save(path)


def guide_graph(path: Path, photos: list[bytes]) -> None:
    import keras
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    tf1 = tf.compat.v1
    keras.utils.set_random_seed(1)
    body = keras.applications.InceptionV3(weights=None, include_top=False, pooling="avg",
                                          input_shape=(GUIDE_SIZE, GUIDE_SIZE, 3))
    set_batch_norms(body, crops(photos, GUIDE_SIZE, whole_image=True) / 128 - 1)
    function = tf.function(lambda x: body(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, GUIDE_SIZE, GUIDE_SIZE, 3), tf.float32))
    frozen = convert_variables_to_constants_v2(function)
    rng = np.random.default_rng(2)
    graph = tf.Graph()
    with graph.as_default():
        contents = tf1.placeholder(tf.string, name="DecodeJpeg/contents")
        x = tf.io.decode_jpeg(contents, channels=3, name="DecodeJpeg")
        x = tf.expand_dims(tf.cast(x, tf.float32, name="Cast"), 0, name="ExpandDims")
        x = tf1.image.resize_bilinear(x, [GUIDE_SIZE, GUIDE_SIZE], name="ResizeBilinear")
        x = tf.multiply(tf.subtract(x, 128.0, name="Sub"), 1.0 / 128, name="Mul")
        (pooled,) = tf1.import_graph_def(frozen.graph.as_graph_def(), input_map={frozen.inputs[0].name: x},
                                                   return_elements=[frozen.outputs[0].name], name="inception")
        pool = tf.reshape(pooled, [1, 2048], name="pool_3/_reshape")
        bottleneck = tf1.placeholder_with_default(pool, [1, 2048], name="input/BottleneckInputPlaceholder")
        weights = (rng.normal(size=(2048, len(FLOWERS))) * 0.05).astype(np.float32)
        logits = tf.add(tf.matmul(bottleneck, weights, name="final_training_ops/Wx_plus_b/MatMul"),
                        np.zeros(len(FLOWERS), np.float32), name="final_training_ops/Wx_plus_b/add")
        tf.nn.softmax(logits, name="final_result")
    path.write_bytes(graph.as_graph_def().SerializeToString())


def outcome(report: dict) -> str:
    verdict = "passed" if report["passed"] else f"REJECTED: {report['reason']}"
    return (f"top-1 agreement {report['top1_agreement']:.3f}, max |p difference| {report['max_abs_difference']:.2g}; "
            f"{verdict}")


def build(directory: Path) -> None:
    photos = samples.photo_set(16, seed=3, objects=True)
    (directory / "flowers.txt").write_text("\n".join(FLOWERS) + "\n")
    mobilenet(directory / "mobilenetv2.keras", photos)
    guide_graph(directory / "output_graph.pb", photos)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)  # the sources, into DIR
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.build:
        return build(args.build)
    print(f"CPU flags: {' '.join(cpu_flags()) or 'none of ' + ', '.join(FLAGS)}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="modelport-import-") as tmp:
        tmp = Path(tmp)
        # Built in a process of its own: with TensorFlow and the built models held in this process,
        # the timed import of MobileNetV2 took 20 s instead of 11 s on 2 cores.
        subprocess.run([sys.executable, __file__, "--build", str(tmp)], check=True, stdout=subprocess.DEVNULL)
        floor_s, _ = timed([sys.executable, "-c", "import tensorflow, tf2onnx"])

        total_s, report = import_cli(tmp / "mobilenetv2.keras", "--output", tmp / "models")
        print(f"MobileNetV2 224 px .keras, end to end: {total_s:5.1f} s = {total_s / BAR_S:.2f} x the {BAR_S:.0f} s "
              f"bar ({outcome(report)})")
        print(f"  start-up floor (python -c 'import tensorflow, tf2onnx'): {floor_s:5.1f} s")
        print(f"  the check: source (Keras) {report['source_s']:.2f} s + bundle (decode + ONNX Runtime) "
              f"{report['bundle_s']:.2f} s on {report['images']} photos")

        guide_s, report = import_cli(tmp / "output_graph.pb", "--labels", tmp / "flowers.txt", "--input", "Mul:0",
                                     "--output-tensor", "final_result:0", "--preprocess", "inception",
                                     "--output", tmp / "models")
        size_mb = (tmp / "output_graph.pb").stat().st_size / 1e6

        import tensorflow  # noqa: F401  (loaded first: the conversion alone is timed below)
        import tf2onnx  # noqa: F401

        from modelport.importer import tensorflow as tf_sources
        start = time.perf_counter()
        converted = tf_sources.keras(tmp / "mobilenetv2.keras")
        convert_s = time.perf_counter() - start
        print(f"  the conversion alone (load + tf2onnx, in process): {convert_s:5.1f} s = "
              f"{convert_s / total_s:.2f} of end to end ({len(converted.onnx.graph.node)} ONNX nodes)")
        print(f"guide-like graph (Inception v3 body, {GUIDE_SIZE} px, {size_mb:.0f} MB), end to end: {guide_s:5.1f} s "
              f"= {guide_s / BAR_S:.2f} x the {BAR_S:.0f} s bar ({outcome(report)}; check: source (TensorFlow, "
              f"from the JPEG) {report['source_s']:.2f} s, bundle {report['bundle_s']:.2f} s)")


if __name__ == "__main__":
    main()
