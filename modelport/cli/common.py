"""What several commands share: loading a model, the --log-level option, a gated run that exits 1 when refused."""

from __future__ import annotations

import json

import click

LOG_LEVEL_OPTION = click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
                                show_default=True)


def load_model(ref: str | None, *, quiet: bool = False):
    """Resolve and load a model, with a progress line if the default model must be built first."""
    from modelport.packaged import default_model
    from modelport.engine.model import Model

    if (ref is None or ref == default_model.NAME) and not default_model.default_model_dir().is_dir() and not quiet:
        from rich.console import Console

        with Console(stderr=True).status(f"Building {default_model.NAME} (first use only)..."):
            path = default_model.resolve(ref)
    else:
        path = default_model.resolve(ref)
    return Model.load(path)


def run_gated(run, rejected: type, as_json: bool):
    """``run(progress)`` with progress lines on stderr; when its gate refuses (``rejected``, which
    carries a ``report``), print the report and exit 1: nothing was written."""
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)  # a message stays on one line (grep)
    try:
        return run(lambda message: console.print(f"[dim]{message}[/dim]"))
    except rejected as exc:
        if as_json:
            click.echo(json.dumps(exc.report.as_dict()))
        console.print(f"[bold red]{exc.message}[/bold red]")
        raise SystemExit(1)
