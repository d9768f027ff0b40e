"""Where a hospital's data, privacy ledger and budget come from, for the one ClientApp
(``fedtwin.client.client_app:app``) in deployment and in simulation.

**Deployment** (a hospital's ``flower-supernode``): what the hospital decides is in its node
config (``--node-config``), never in the server's run config:

    data='/srv/archive'            its images: a DICOM folder with labels.csv (as
                                   ``fedtwin hospitals make`` writes, with hospital.json),
                                   or a MedMNIST-format .npz
    ledger='/srv/ledger.sqlite'    its privacy ledger (fedtwin.ledger)
    epsilon=10.0                   its budget over everything it ever releases
    delta=1e-5                     (optional; default the run's privacy.delta)
    name='hospital-0'              (optional; default from hospital.json or the file name)
    dp=true                        (optional; only a node config can turn DP off)
    hybrid=true                    (optional; false: never send the scores of classifiers
                                   trained here, whatever the run's eval.hybrid: neither
                                   the hybrid utility's nor the two-sample test's)

The run's other settings (model, rounds, local steps, batch size) come from the server.
The budget comes only from here; the server cannot raise it or switch DP off.

**Simulation** (``flwr run .``, Flower's Simulation Engine): a node has only its
``partition-id``. Its hospital is that part of ``data.*`` split as ``fedtwin demo`` splits
it (``federation.hospitals``, ``federation.partition``, ``federation.alpha``), its budget is
the run's ``privacy.*`` and its ledger ``<out>/ledgers/<hospital>.sqlite``.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context

from fedtwin.config import check_config, config_from_run
from fedtwin.seeds import derive_seed

if TYPE_CHECKING:
    from fedtwin.data import Hospital

REQUIRED = ("data", "ledger", "epsilon")


def deployed(context: Context) -> bool:
    """A hospital's own SuperNode (its node config names its data), not a simulated one."""
    return "partition-id" not in context.node_config


def run_settings(context: Context) -> dict:
    """The run config's settings, composed once per process (Hydra takes about a second)."""
    items = tuple(sorted((str(k), v) for k, v in context.run_config.items()))
    return copy.deepcopy(_composed(items))


@functools.lru_cache(maxsize=4)
def _composed(items: tuple) -> dict:
    return config_from_run(dict(items))


def settings(context: Context) -> dict:
    """The run's settings; deployed, with the hospital's own privacy budget."""
    cfg = run_settings(context)
    if not deployed(context):
        return cfg
    node = context.node_config
    missing = [k for k in REQUIRED if k not in node]
    if missing:
        raise ValueError(
            f"node config lacks {', '.join(missing)}: start flower-supernode with "
            f"--node-config \"data='/path/archive' ledger='/path/ledger.sqlite' epsilon=10.0\""
        )
    privacy = {
        **cfg["privacy"],
        "enabled": bool(node.get("dp", True)),
        "epsilon": float(node["epsilon"]),
        "delta": float(node.get("delta", cfg["privacy"]["delta"])),
    }
    hybrid = bool(cfg["eval"]["hybrid"]) and bool(node.get("hybrid", True))
    cfg = {**cfg, "privacy": privacy, "eval": {**cfg["eval"], "hybrid": hybrid}}
    check_config(cfg)  # the node's own budget too
    return cfg


def load_site(context: Context) -> Hospital:
    """The hospital's images and its fixed holdout."""
    cfg = run_settings(context)
    if not deployed(context):
        return simulated_hospital(context, cfg)
    node = context.node_config
    return load_archive(
        str(node["data"]),
        str(node.get("name", "")),
        int(cfg["data"]["image_size"]),
        float(cfg["federation"]["holdout_fraction"]),
        n_classes=len(cfg["data"]["classes"]),
        channels=int(cfg["data"].get("channels", 1)),
    )


def ledger_path(context: Context, hospital: Hospital) -> Path:
    """Deployed: the node config's ``ledger``; simulated: ``<out>/ledgers/<hospital>.sqlite``."""
    if not deployed(context):
        return run_out(context) / "ledgers" / f"{hospital.name}.sqlite"
    if "ledger" not in context.node_config:
        raise ValueError(
            f"{hospital.name}: the node config has no 'ledger' (the privacy ledger's path, "
            f"e.g. --node-config \"ledger='/var/lib/fedtwin/ledger.sqlite'\")"
        )
    return Path(str(context.node_config["ledger"]))


def run_out(context: Context) -> Path:
    """The run's output folder (run config ``out``), on the operator's machine."""
    return Path(str(context.run_config.get("out", "runs/flwr"))).resolve()


def simulated_hospital(context: Context, cfg: dict) -> Hospital:
    part, parts = int(context.node_config["partition-id"]), int(cfg["federation"]["hospitals"])
    if part >= parts:
        raise ValueError(
            f"simulated SuperNode {part} has no hospital: federation.hospitals={parts}; run "
            f'with as many SuperNodes (flwr run . --federation-config "num-supernodes={parts}")'
        )
    keys = {k: cfg[k] for k in ("data", "federation", "seed")}
    return _simulated_hospitals(json.dumps(keys, sort_keys=True))[part]


@functools.lru_cache(maxsize=1)
def _simulated_hospitals(keys: str) -> list[Hospital]:
    from fedtwin.demo import load_real_data, simulate_hospitals

    cfg = json.loads(keys)
    train, _, _ = load_real_data(cfg)
    return simulate_hospitals(cfg, train)


@functools.lru_cache(maxsize=2)
def load_archive(
    data: str,
    name: str,
    image_size: int,
    holdout_fraction: float,
    n_classes: int | None = None,
    channels: int = 1,
) -> Hospital:
    """The hospital's images and its fixed holdout (the same at every start)."""
    from fedtwin.data import load_npz, split_hospital  # imported by the messages that need
    from fedtwin.ingest import ingest  # the images, not by SecAgg+'s key messages

    path = Path(data)
    if path.is_dir():
        result = ingest(path, image_size, n_classes=n_classes, channels=channels)
        print(f"fedtwin: {result.summary()}", file=sys.stderr)
        info_path = path / "hospital.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        name = name or str(info.get("name", path.name))
        fraction = float(info.get("holdout_fraction", holdout_fraction))
        seed = int(info.get("holdout_seed", derive_seed(name)))
        return split_hospital(name, result.data, fraction, seed)
    if path.suffix == ".npz":
        name = name or path.stem
        data = load_npz(path, "train", channels)
        return split_hospital(name, data, holdout_fraction, derive_seed(name))
    raise FileNotFoundError(
        f"node config data={data!r}: expected a DICOM folder with labels.csv or a .npz file"
    )
