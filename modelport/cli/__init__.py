"""The ``modelport`` command line: the ``main`` group; each command lives in the module of its group.

Command modules import only click and light settings at the top: what a command runs is imported
inside it, so ``modelport --help`` stays fast and an ONNX-only install never imports torch.
"""

from __future__ import annotations

import click

from modelport.cli import bench, classify, cluster, importer, keys, models, pipeline, rollout, serve
from modelport.errors import ModelportError


class _Group(click.Group):
    """Turns modelport errors into one clear line and the error's exit code, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModelportError as exc:
            click.echo(f"modelport: {exc.message}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group)
@click.version_option(package_name="modelport")
def main() -> None:
    """Put a trained image model into production: classify, serve, retrain."""


for command in (classify.classify, classify.samples,
                models.build_model, models.build_default, models.retrain, models.optimize, importer.import_model,
                serve.serve, keys.keys,
                cluster.balance, cluster.autoscale, cluster.resolve, cluster.dns, cluster.cluster,
                pipeline.pipeline, rollout.rollout, bench.bench):
    main.add_command(command)
