"""Commands that make model versions: ``build-model``, ``build-default``, ``retrain``, ``optimize``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from modelport.cli.common import load_model, run_gated
from modelport.runtime.precision import ENGINE_CHOICES


@click.command()
@click.argument("data", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name: the bundle goes to OUTPUT/NAME/<next version>.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("models"),
              show_default=True, help="Repository directory to write the new version into.")
@click.option("--backbone", default=None, help="Backbone model with a 'features' output. Default: efficientnet-lite0.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation split.")
@click.option("--min-per-class", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--confusion-png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the validation confusion matrix into this PNG.")
@click.option("--int8", is_flag=True, help="Also quantize the new version (modelport optimize: calibrated on the "
                                           "training images, checked on the validation images) into the next one.")
def retrain(data: Path, name: str, output: Path, backbone: str | None, val_fraction: float, seed: int,
            min_per_class: int, confusion_png: Path | None, int8: bool) -> None:
    """Fine-tune the backbone on DATA (one sub-directory of images per class) into a new bundle version."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from modelport.retrain import retrain as run_retrain
    from modelport.retrain.report import confusion_png as draw, render

    console = Console(stderr=True)
    columns = (TextColumn("features"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("features", total=None, rate="-")
        started = [None]

        def progress(done: int, total: int) -> None:
            import time

            now = time.perf_counter()
            started[0] = started[0] or now
            rate = done / (now - started[0]) if now > started[0] else 0
            bar.update(task, completed=done, total=total, rate=f"{rate:.0f}")

        result = run_retrain(data, name=name, output=output, backbone=backbone, val_fraction=val_fraction,
                             seed=seed, min_per_class=min_per_class, progress=progress)
    x = result.extraction
    console.print(f"{x.computed} images computed, {x.cache_hits} from the feature cache, "
                  f"{len(x.unreadable)} unreadable skipped, in {x.seconds:.1f} s")
    for path, why in list(result.skipped.items())[:10]:
        console.print(f"  skipped {path}: {why}")
    render(result.report, console)
    if confusion_png:
        draw(result.report, confusion_png)
        console.print(f"confusion matrix drawn to {confusion_png}")
    click.echo(result.bundle)
    if int8:
        from modelport.optimize.int8 import optimize as run
        from modelport.retrain import dataset

        split = dataset.scan(data, val_fraction=val_fraction, seed=seed, min_per_class=min_per_class)
        readable = result.extraction.features  # what retrain could decode; the rest was skipped
        train = [e for e in split.train if e.path in readable]
        val = [e for e in split.val if e.path in readable]
        _optimize_and_report(lambda progress: run(result.bundle, [e.path.read_bytes() for e in train],
                                                  [e.path.read_bytes() for e in val],
                                                  labels=[e.label for e in val], progress=progress))


@click.command("build-model")
@click.argument("name", type=click.Choice(["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]))
@click.option("--runtime", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="Export to ONNX (ONNX Runtime) or to TorchScript (the PyTorch runtime).")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Repository to write NAME/<next version> into. Default: $MODELPORT_HOME/models.")
@click.option("--int8", is_flag=True, help="Quantize it (modelport optimize, calibrated and checked on the sample "
                                           "photos) into its own model, NAME-int8.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.995, show_default=True,
              help="With --int8: as for modelport optimize.")
@click.option("--min-top5", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="With --int8: as for modelport optimize.")
def build_model(name: str, runtime: str, output: Path | None, int8: bool, min_agreement: float,
                min_top5: float) -> None:
    """Build a packaged model (EfficientNet-Lite0/1/2, ImageNet) into a repository as a new version."""
    import tempfile

    from modelport.home import model_home
    from modelport.packaged import default_model
    from modelport.packaged.weights import build
    from modelport.repository import layout as repository

    root = output or model_home() / "models"
    if not int8:
        existing = [int(p.name) for p in repository.versions(root / name)]
        click.echo(build(name, root / name / str(max(existing, default=0) + 1), runtime=runtime))
        return
    if runtime != "onnx":
        raise click.UsageError("--int8 quantizes ONNX models: use it with --runtime onnx")
    from modelport.optimize.int8 import checked_variant, optimize as run, publish, sample_calibration, sample_evaluation
    from modelport.optimize.report import gate
    from modelport.repository.bundle import load_bundle

    target_model = root / f"{name}-int8"
    existing = [int(p.name) for p in repository.versions(target_model)]
    target = target_model / str(max(existing, default=0) + 1)

    def quantize(fp32: Path) -> None:
        _optimize_and_report(lambda progress: run(fp32, sample_calibration(), sample_evaluation(), target_dir=target,
                                                  min_agreement=min_agreement, min_top5=min_top5,
                                                  progress=progress))

    if name == default_model.NAME:  # the default model's cached build (made now if it is not there yet)
        fp32 = default_model.ensure_default_model(checks=False)
        checked = checked_variant(fp32)
        # Checked when it was built, with the same recipe on the same sample photos: published as
        # it is if that check clears this gate too.
        if checked is not None and not gate(checked[1].agreement, min_agreement=min_agreement, min_top5=min_top5):
            click.echo(f"the INT8 graph checked when {name} was built, on the same sample photos: not quantized again",
                       err=True)
            _optimize_and_report(lambda progress: (publish(load_bundle(fp32), checked[0], checked[1], target),
                                                   checked[1]))
            return
        quantize(fp32)
        return
    with tempfile.TemporaryDirectory(prefix="modelport-build-") as tmp:
        quantize(build(name, Path(tmp) / name / "1", runtime="onnx", checks=False))


@click.command("build-default")
@click.option("--checks/--no-checks", default=True, show_default=True,
              help="Check it at the reduced precisions this CPU runs (bf16, INT8), as `serve`'s first use does. "
                   "--no-checks for an image built on one machine and run on others: it serves at fp32.")
def build_default(checks: bool) -> None:
    """Build the default model (EfficientNet-Lite0, ImageNet) into the cache and print its path."""
    from modelport.packaged import default_model

    if checks:
        load_model(None)
    else:
        default_model.ensure_default_model(checks=False)
    click.echo(default_model.default_model_dir())


@click.command()
@click.argument("model_ref", metavar="MODEL")
@click.option("--precision", type=click.Choice(["int8", "bf16"]), default="int8", show_default=True,
              help="int8: a quantized graph, calibrated on --calibration. bf16: the same graph, served at bf16 by "
                   "OpenVINO where the CPU computes bf16 natively (checked on --eval, or on --calibration's images).")
@click.option("--runtime", "engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True,
              help="The engine the gate checks on and the new version runs on; auto: every installed engine, the "
                   "fastest that passes (bf16: OpenVINO).")
@click.option("--calibration", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Images like the ones the model will see (100-500; flat, or in <class>/ folders). Needed for int8.")
@click.option("--eval", "eval_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Held-out images for the report; <class>/ folders named after the labels add accuracy. "
                   "Default: the last third of the calibration images.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.995, show_default=True,
              help="Top-1 agreement with fp32 needed on images fp32 is confident about (top-1 >= 0.5).")
@click.option("--min-top5", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="Share of the new version's top-1 answers that must be inside fp32's top 5.")
@click.option("--per-tensor", is_flag=True, help="Per-tensor weights instead of per-channel (to compare recipes).")
@click.option("--calibration-method", type=click.Choice(["percentile", "minmax", "entropy"]), default="percentile",
              show_default=True)
@click.option("--max-fp32-layers", type=click.IntRange(min=0), default=8, show_default=True,
              help="At most this many of the most sensitive layers are kept in fp32.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def optimize(model_ref: str, precision: str, engine: str, calibration: Path | None, eval_dir: Path | None,
             min_agreement: float, min_top5: float, per_tensor: bool, calibration_method: str, max_fp32_layers: int,
             as_json: bool) -> None:
    """Make MODEL's next version at a reduced precision (INT8 or bf16), with an accuracy report;
    refuse if answers are lost.

    MODEL is a model directory (its highest version is the source) or a version directory. Exit
    status 1 and nothing written when the new version misses --min-agreement or --min-top5.
    """
    from modelport.packaged import default_model
    from modelport.repository.bundle import load_bundle
    from modelport.folders import find_images, truth_from_labels

    source = default_model.resolve(model_ref)
    evaluation, truth = None, None
    if eval_dir is not None:
        eval_paths, labels = find_images(eval_dir)
        evaluation = [p.read_bytes() for p in eval_paths]
        if labels is not None:
            truth = truth_from_labels(labels, load_bundle(source).labels)
    if precision == "bf16":
        if engine == "onnxruntime":
            raise click.UsageError("--precision bf16 runs on OpenVINO (ONNX Runtime has no bf16 kernels on the CPU)")
        from modelport.optimize import bf16

        if evaluation is None:
            if calibration is None:
                raise click.UsageError("--precision bf16 needs images to check on: --eval (or --calibration)")
            evaluation = [p.read_bytes() for p in find_images(calibration)[0]]
        _optimize_and_report(lambda progress: bf16.optimize(
            source, evaluation, labels=truth, min_agreement=min_agreement, min_top5=min_top5, progress=progress),
            as_json)
        return
    if calibration is None:
        raise click.UsageError("--precision int8 needs --calibration: images like the ones the model will see")
    from modelport.optimize.int8 import CANDIDATE_FP32_LAYERS, optimize as run
    from modelport.optimize.quantize import Recipe

    calibration_paths, _ = find_images(calibration)
    recipe = Recipe(per_channel=not per_tensor, calibration=calibration_method)
    candidates = [k for k in CANDIDATE_FP32_LAYERS if k <= max_fp32_layers]
    _optimize_and_report(lambda progress: run(
        source, [p.read_bytes() for p in calibration_paths], evaluation, labels=truth, recipe=recipe,
        min_agreement=min_agreement, min_top5=min_top5, candidates=candidates, engine=engine, progress=progress),
        as_json)


def _optimize_and_report(run, as_json: bool = False) -> None:
    """Call ``run(progress)`` of modelport.optimize; print its report and the new version, or exit 1 if refused."""
    from rich.console import Console

    from modelport.optimize.int8 import Refused

    published, report = run_gated(run, Refused, as_json)
    if as_json:
        click.echo(json.dumps({"bundle": str(published), **report.as_dict()}))
        return
    _print_report(report, Console())
    click.echo(published)


def _print_report(report, console) -> None:
    from rich.table import Table

    a = report.agreement
    reduced = report.precision.upper()
    table = Table(title=f"{reduced} on {report.engine} against fp32 on {a.images} held-out images", show_header=False)
    rows = [("recipe", report.recipe),
            ("layers kept in fp32", ", ".join(report.fp32_layers) or "none"),
            ("top-1 agreement, all images", f"{a.top1:.1%}"),
            (f"  on images fp32 is confident about ({a.confident_images})",
             "n/a" if a.top1_confident is None else f"{a.top1_confident:.1%}"),
            (f"  on images with a clear top-1 ({a.clear_images})", "n/a" if a.top1_clear is None else f"{a.top1_clear:.1%}"),
            (f"{reduced} top-1 inside fp32's top 5", f"{a.in_top5:.1%}"),
            ("top-5 overlap", f"{a.top5_overlap:.1%}"),
            ("yardstick: fp32 keeps its own answer after a JPEG q90 re-encode",
             "n/a" if a.jpeg_yardstick is None else f"{a.jpeg_yardstick:.1%}")]
    if a.accuracy_fp32 is not None:
        rows.append((f"accuracy fp32 -> {reduced}", f"{a.accuracy_fp32:.1%} -> {a.accuracy_reduced:.1%}"))
    rows += [(f"speed at batch {s.batch}", f"{s.ratio:.2f} x fp32 ({s.reduced_per_s:.0f} vs {s.fp32_per_s:.0f} img/s)")
             for s in report.speed]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if a.confident_images < 50:
        console.print(f"[yellow]Only {a.confident_images} evaluation images are ones fp32 is confident about: the "
                      f"agreement figures are rough. Give --eval more images of the model's classes.[/yellow]")
