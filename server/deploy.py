"""Consortium side in deployment: the ServerApp that ``flwr run`` starts at the SuperLink.

Its settings come from the Flower run config (``[tool.flwr.app.config]`` of the app that
``fedtwin deploy app`` writes, or ``flwr run --run-config``):

    out        the operator's output folder: checkpoints, history.json, twin/, keys/
    overrides  Hydra overrides of the run, as on the demo's command line, e.g.
               "federation.hospitals=3 federation.rounds=20 twin.signing_key=/keys/sign.pem"

The training itself is ``train_and_publish``, the same as in the demo's simulation.
"""

from __future__ import annotations

import shlex
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedtwin.config import check_config, config_from_run, load_config
from fedtwin.jsonio import write_json
from fedtwin.server.server_app import train_and_publish

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run(context.run_config)
    out = Path(str(context.run_config.get("out", "runs/deploy"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg)
    log(INFO, "fedtwin run %s: output in %s", context.run_id, out)
    train_and_publish(grid, context, cfg, out)


APP_PYPROJECT = """\
# The Flower app of a fedtwin consortium, for `flwr run`. Its code is the installed fedtwin
# package (on the operator's machine and at every hospital); this file only names it.
[project]
name = "fedtwin-consortium"
version = "{version}"
license = "Apache-2.0"
description = "fedtwin: federated, differentially private synthetic twins"
dependencies = []

[tool.flwr.app]
publisher = "fedtwin"

[tool.flwr.app.components]
serverapp = "fedtwin.server.deploy:server_app"
clientapp = "fedtwin.client.deploy:client_app"

[tool.flwr.app.config]
out = "{out}"
overrides = "{overrides}"
"""


def write_app(directory: Path, out: Path, overrides: str = "") -> Path:
    """Write the Flower app folder ``directory`` (one pyproject.toml) for ``flwr run``."""
    from fedtwin import __version__

    if '"' in overrides or "\\" in overrides:
        raise ValueError("overrides: no double quotes or backslashes (use single quotes)")
    check_config(load_config(shlex.split(overrides)))  # a mistake shows now, not at `flwr run`
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pyproject.toml"
    text = APP_PYPROJECT.format(
        version=__version__, out=Path(out).resolve().as_posix(), overrides=overrides
    )
    path.write_text(text)
    return path
