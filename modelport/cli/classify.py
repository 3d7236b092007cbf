"""``modelport classify`` (labels for image files) and ``modelport samples`` (two photos to try it on)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from modelport.cli.common import load_model
from modelport.errors import ModelportError


@click.command()
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", "model_ref", default=None,
              help="A bundle directory, a model directory (highest version wins) or a model name. "
                   "Default: efficientnet-lite0.")
@click.option("--top-k", "-k", type=click.IntRange(min=1), default=None, help="How many labels to print (default: the bundle's, 5).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image instead of label_image-style lines.")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read image paths from standard input, one per line; write one JSON line per path.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per inference batch with --stdin.")
def classify(images: tuple[Path, ...], model_ref: str | None, top_k: int | None, as_json: bool, from_stdin: bool,
             batch_size: int) -> None:
    """Print the top-k labels of each IMAGE (or of each path read from stdin with --stdin).

    Exit status: 0 if every image was classified, 1 if any failed, 2 for a model problem.
    """
    if not images and not from_stdin:
        raise click.UsageError("give one or more IMAGE paths, or --stdin")
    if images and from_stdin:
        raise click.UsageError("give IMAGE paths or --stdin, not both")
    model = load_model(model_ref)
    k = top_k or model.bundle.serving.top_k
    if from_stdin:
        from modelport.engine.stream import classify_stream

        def emit(result: dict) -> None:
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()

        failures = classify_stream(model, sys.stdin, emit, top_k=k, batch_size=batch_size)
        sys.exit(1 if failures else 0)

    failures = 0
    for path in images:
        try:
            predictions = model.classify([path.read_bytes()], k)[0]
        except (ModelportError, OSError) as exc:
            failures += 1
            message = exc.message if isinstance(exc, ModelportError) else (exc.strerror or str(exc))
            if as_json:
                click.echo(json.dumps({"path": str(path), "error": message}))
            else:
                click.echo(f"{path}: error: {message}", err=True)
            continue
        if as_json:
            click.echo(json.dumps({"path": str(path), "predictions": [p.as_dict() for p in predictions]}))
            continue
        if len(images) > 1:
            click.echo(f"{path}:")
        for p in predictions:
            click.echo(f"{p.label} (score = {p.score:.5f})")
    sys.exit(1 if failures else 0)


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."))
def samples(directory: Path) -> None:
    """Write two sample photos with known answers into DIRECTORY: cat.jpg and espresso.jpg."""
    from modelport.samples import write_samples

    for path in write_samples(directory):
        click.echo(path)
