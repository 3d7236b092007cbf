"""``modelport rollout status | promote | abort``: a server's rollout of a new version, over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def rollout() -> None:
    """Safe rollouts of new versions (a [rollout] table in the model's model.toml): status, promote, abort."""


_server_option = click.option("--url", default="http://127.0.0.1:12480", show_default=True, envvar="MODELPORT_URL",
                              help="The server that runs the rollout.")
_token_option = click.option("--admin-token", envvar="MODELPORT_ADMIN_TOKEN", required=True,
                             help="The server's --admin-token (also read from $MODELPORT_ADMIN_TOKEN).")


@rollout.command("status")
@click.argument("model")
@_server_option
@click.option("--json", "as_json", is_flag=True)
def rollout_status(model: str, url: str, as_json: bool) -> None:
    """The latest rollout of MODEL (a name, or the model's directory in the repository)."""
    _print_rollout(_rollout_call("GET", url, model, ""), as_json)


def _rollout_decision(action: str, summary: str) -> None:
    @rollout.command(action, help=summary)
    @click.argument("model")
    @_server_option
    @_token_option
    def decide(model: str, url: str, admin_token: str) -> None:
        _print_rollout(_rollout_call("POST", url, model, action, admin_token), False)


_rollout_decision("promote", "Promote MODEL's candidate version now, skipping what is left of its judgement.")
_rollout_decision("abort", "Roll MODEL's candidate version back now.")


def _rollout_call(method: str, url: str, model: str, action: str, token: str | None = None) -> dict:
    import httpx

    from modelport.client.common import http_request
    from modelport.protocol.errors import error_from_http

    name = Path(model).name  # models/flowers -> flowers
    path = f"/v2/models/{name}/rollout" if not action else f"/v2/repository/models/{name}/rollout/{action}"
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url.rstrip("/"), timeout=30) as http:
        response = http_request(http, url, 30, method, path, headers=headers)
    if response.status_code != 200:
        raise error_from_http(response.status_code, response.content, response.headers)
    return response.json()


def _print_rollout(status: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(status))
        return
    shadow, canary = status["shadow"], status["canary"]
    click.echo(f"{status['model']}: version {status['candidate_version']} against {status['serving_version']}: "
               f"{status['stage'].replace('_', ' ')}" + (f" ({status['reason']})" if status["reason"] else ""))
    click.echo(f"  shadow: {shadow['compared']} compared, agreement {shadow['agreement']:.3f}, {shadow['errors']} "
               f"errors, {shadow['dropped']} dropped (busy), p99 compute ratio {shadow['p99_compute_ratio']}")
    click.echo(f"  canary: {canary['answers']} answers, {canary['errors']} errors, p99 latency ratio "
               f"{canary['p99_latency_ratio']}")
