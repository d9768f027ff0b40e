"""The Flower app folder for ``flwr run`` on a machine without fedtwin's source tree: one
``pyproject.toml`` naming the installed ServerApp and ClientApp (the same components as the
repository's own ``pyproject.toml``) and the run's output folder and overrides.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from fedtwin.config import check_config, load_config

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
serverapp = "fedtwin.server.server_app:app"
clientapp = "fedtwin.client.client_app:app"

[tool.flwr.app.config]
out = "{out}"
overrides = "{overrides}"
"""


def write_app(
    directory: Path,
    out: Path,
    overrides: str = "",
    config: Path | None = None,
    progress: Path | None = None,
) -> Path:
    """Write the Flower app folder ``directory`` (one pyproject.toml) for ``flwr run``: the
    run writes to ``out`` with the shipped settings and ``overrides``, or with the resolved
    settings of the JSON file ``config`` (as ``fedtwin demo`` writes ``config.json``), and
    its progress events (``fedtwin.progress``) to ``progress`` if given."""
    from fedtwin import __version__

    if '"' in overrides or "\\" in overrides:
        raise ValueError("overrides: no double quotes or backslashes (use single quotes)")
    if config is not None and overrides:
        raise ValueError("give the run's overrides or a resolved config file, not both")
    check_config(load_config(shlex.split(overrides)))  # a mistake shows now, not at `flwr run`
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pyproject.toml"
    text = APP_PYPROJECT.format(
        version=__version__, out=Path(out).resolve().as_posix(), overrides=overrides
    )
    if config is not None:
        text += f'config = "{Path(config).resolve().as_posix()}"\n'
    if progress is not None:
        text += f'progress = "{Path(progress).resolve().as_posix()}"\n'
    path.write_text(text)
    return path
