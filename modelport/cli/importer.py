"""``modelport import``: a model from another framework becomes a checked bundle."""

from __future__ import annotations

import json
from pathlib import Path

import click

from modelport.cli.common import run_gated

PRESET_NAMES = ("inception", "keras-mobilenet", "torchvision", "caffe", "unit", "raw")


@click.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="One label per line, in the order of the output's classes (default: ImageNet's, for 1000 classes).")
@click.option("--name", default=None, help="Model name in the repository (default: the source's file name).")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("models"),
              show_default=True, help="Repository: the bundle goes to OUTPUT/NAME/<next version>.")
@click.option("--input", "input_tensor", default=None,
              help="Graph input tensor, or where to cut a frozen graph (the retrain guide's: Mul:0).")
@click.option("--output-tensor", default=None, help="Graph output holding the class scores (the guide's: final_result:0).")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Input height and width, for a graph that takes any size (TorchScript always).")
@click.option("--preprocess", type=click.Choice(PRESET_NAMES), default=None,
              help="How pixels become the input (read from the source where it says: keras.applications).")
@click.option("--mean", nargs=3, type=float, default=None, help="Per-channel mean of 0..255 pixels, with --std.")
@click.option("--std", nargs=3, type=float, default=None, help="Per-channel std of 0..255 pixels, with --mean.")
@click.option("--check-images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Photos for the check (default: sample photos of ImageNet objects).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.98, show_default=True,
              help="Least top-1 agreement of the bundle with its source on the check photos.")
@click.option("--max-difference", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Largest difference of any probability between the bundle and its source.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def import_model(source: Path, labels: Path | None, name: str | None, output: Path, input_tensor: str | None,
                 output_tensor: str | None, image_size: int | None, preprocess: str | None, mean, std,
                 check_images: Path | None, min_agreement: float, max_difference: float, as_json: bool) -> None:
    """Import SOURCE (ONNX, TorchScript, Keras .keras/.h5, a SavedModel directory, TFLite, or a frozen
    GraphDef .pb) as the next version of a model, checked against the source on real photos.

    Exit status 1 and nothing written when the bundle and its source disagree (the report says how).
    """
    from rich.console import Console

    from modelport.importer import ImportRejected, import_model as run

    result = run_gated(lambda progress: run(
        source, labels=labels, name=name, output=output, input=input_tensor, output_tensor=output_tensor,
        image_size=image_size, preprocess=preprocess, mean=mean or None, std=std or None, check_images=check_images,
        min_agreement=min_agreement, max_difference=max_difference, progress=progress), ImportRejected, as_json)
    if as_json:
        click.echo(json.dumps({"bundle": str(result.path), "version": result.version, **result.report.as_dict()}))
        return
    console = Console(stderr=True, soft_wrap=True)  # a message stays on one line (grep)
    console.print(result.report.text())
    for note in result.converted.notes:
        console.print(f"[dim]{note}[/dim]")
    click.echo(result.path)
