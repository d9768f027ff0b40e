"""Hospital side: the Flower ClientApp, a thin shell around ``fedtwin.client.hospital``.

- ``train``: each round it receives the global weights, runs the hospital's DP local round
  within the budget of its privacy ledger and sends back weights, example count and
  epsilon (``hospital.train``).
- ``query.audit``: after training it receives the candidate twin and a classifier trained
  on it and sends back the privacy audit's and the utility scoring's aggregates over the
  hospital's own images (``hospital.audit``).
- Every hospital answers SecAgg+ (``fedtwin.client.secagg``) when the server asks for it.

``app`` is the one ClientApp that ``pyproject.toml`` names, for deployment and simulation
alike (``fedtwin.client.site``: where a node finds its hospital, ledger and budget).

In deployment each message starts a fresh ClientApp process, and a SecAgg+ round sends
four: so this module imports only Flower, and torch and Opacus are imported by the
messages that train or audit, not by the three that only agree and reveal keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtwin.client import site
from fedtwin.client.secagg import secure_aggregation

if TYPE_CHECKING:
    from fedtwin.data import Hospital


def make_client_app(
    config: dict | Callable[[Context], dict],
    load_hospital: Callable[[Context], Hospital],
    ledger_path: Callable[[Context, Hospital], Path] = site.ledger_path,
    mods: list | None = None,
    outer_mods: list | None = None,
) -> ClientApp:
    """A ClientApp for one consortium run.

    ``config`` is the resolved run config (plain dict), or a function of the node's context
    that gives it (deployment: the run's settings with the hospital's own budget);
    ``load_hospital`` gives the hospital's own data for the node running the app (its
    archive in deployment, its partition in simulation), ``ledger_path`` its privacy
    ledger. The hospital's budget (``privacy.*``) is read here, on the hospital's side.
    ``mods`` are Flower client mods around the handlers: inside the secure aggregation
    mod (``fedtwin.client.secagg``) with which every hospital answers SecAgg+, they see
    plain training messages and replies. ``outer_mods`` go around everything and see the
    SecAgg+ protocol's messages.
    """
    app = ClientApp(mods=[*(outer_mods or []), secure_aggregation, *(mods or [])])

    def settings(context: Context) -> dict:
        return config(context) if callable(config) else config

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedtwin.client import hospital

        site = load_hospital(context)
        with told(context, site.name, task_of(msg)):
            return hospital.train(msg, context, settings(context), site, ledger_path(context, site))

    @app.query("audit")
    def audit(msg: Message, context: Context) -> Message:
        from fedtwin.client import hospital

        site = load_hospital(context)
        with told(context, site.name, "audit"):
            return hospital.audit(msg, settings(context), site, ledger_path(context, site))

    return app


def task_of(msg: Message) -> str:
    """What a training message asks for: "feature release" or "round <n>"."""
    from fedtwin.server import messages

    config = msg.content[messages.CONFIG]
    if str(config.get(messages.TASK, "")) == messages.RELEASE:
        return "feature release"
    return f"round {config['server-round']}"


@contextlib.contextmanager
def told(context: Context, hospital: str, task: str) -> Iterator[None]:
    """``hospital`` doing ``task``, told to the run's progress events (``fedtwin.progress``;
    only ``fedtwin demo`` asks for them, to show on its terminal). A deployed hospital
    tells nothing: it writes no file where the operator's run config says."""
    from fedtwin.progress import Events

    events = Events(None) if site.deployed(context) else Events.from_run(context.run_config)
    events.hospital(hospital, task, finished=False)
    yield
    events.hospital(hospital, task, finished=True)


app = make_client_app(site.settings, site.load_site)
