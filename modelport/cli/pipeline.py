"""``modelport pipeline evaluate``: a cascade's threshold against accuracy or agreement, and cost."""

from __future__ import annotations

import json
from pathlib import Path

import click

from modelport.cli.common import load_model


@click.group()
def pipeline() -> None:
    """Work with pipelines (cascade, chain, ensemble) in a model repository."""


@pipeline.command("evaluate")
@click.argument("pipeline_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("images", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--reference", default=None,
              help="Model to agree with when IMAGES has no <class>/ folders (a name in the repository, a bundle "
                   "or model directory). Default: the cascade's last step.")
@click.option("--target", "--target-agreement", "target", type=click.FloatRange(0, 1), default=0.99,
              show_default=True, help="Accuracy or agreement the chosen threshold must reach.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw cost against accuracy/agreement into this PNG.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON document.")
def pipeline_evaluate(pipeline_dir: Path, images: Path, reference: str | None, target: float,
                      plot_path: Path | None, as_json: bool) -> None:
    """Sweep a cascade's threshold over IMAGES: escalated share, accuracy or agreement, cost per image.

    PIPELINE_DIR is <repository>/<name> holding pipeline.toml; its steps are loaded from the same
    repository. IMAGES with <class>/ folders named after the model's labels give accuracy;
    otherwise agreement with --reference.
    """
    from modelport.folders import find_images
    from modelport.pipeline import evaluate as ev
    from modelport.pipeline.config import PIPELINE_FILE, read_pipeline

    config = read_pipeline(pipeline_dir / PIPELINE_FILE)
    root = pipeline_dir.parent
    steps = [load_model(str(_step_dir(root, step.model, step.version)), quiet=True) for step in config.steps]
    reference_model = None
    if reference is not None:
        local = root / reference
        reference_model = load_model(str(local if local.is_dir() else reference), quiet=True)
    paths, labels = find_images(images)
    with _status(f"Running {len(config.steps)} step(s) over {len(paths)} images..."):
        report = ev.evaluate(config, steps, reference_model, [p.read_bytes() for p in paths], labels, target=target)
    if plot_path is not None:
        ev.plot(report, plot_path)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{pipeline_dir.name}: {report.images} images, {report.measure}")
    for column in ("escalate_below", "escalated", report.measure.split(" ")[0], "ms / image", "cost / accurate"):
        table.add_column(column, justify="right")
    for row in report.rows:
        style = "bold green" if row is report.best else None
        table.add_row(f"{row.threshold:g}", f"{row.escalated:.1%}", f"{row.score:.1%}", f"{row.cost_ms:.2f}",
                      f"{row.relative_cost:.2f}", style=style)
    console = Console()
    console.print(table)
    console.print(f"steps: {', '.join(f'{s.ref} {c:.2f} ms' for s, c in zip(config.steps, report.step_cost_ms))}; "
                  f"accurate model alone: {report.reference_cost_ms:.2f} ms/image, {report.measure} "
                  f"{report.reference_score:.1%}")
    console.print(f"first step's calibration error (ECE, 10 bins): {report.calibration_error:.3f}"
                  + ("  (badly calibrated: its confidence is a poor guide to when to escalate)"
                     if report.calibration_error > 0.1 else ""))
    console.print(ev.verdict(report))
    if plot_path is not None:
        console.print(f"plot: {plot_path}")


def _step_dir(root: Path, model: str, version: str | None) -> Path:
    """A step's version directory: MODEL in ROOT at VERSION (a number or label; None: the highest)."""
    from modelport.errors import NotFound
    from modelport.packaged import default_model
    from modelport.pipeline.config import PIPELINE_FILE
    from modelport.repository.model_config import read_model_config

    model_dir = root / model
    if not model_dir.is_dir():
        raise NotFound(f"step {model!r}: no such model in {root}")
    if (model_dir / PIPELINE_FILE).is_file():
        raise NotFound(f"step {model!r} is a pipeline: evaluate a cascade of models")
    if version is None:
        return default_model.resolve(str(model_dir))
    from modelport import untrusted

    number = version if untrusted.ascii_digits(version) else read_model_config(model_dir).labels.get(version)
    if number is None or not (model_dir / str(number)).is_dir():
        raise NotFound(f"step {model}:{version}: no such version in {model_dir}")
    return model_dir / str(number)


def _status(message: str):
    from rich.console import Console

    return Console(stderr=True).status(message)
