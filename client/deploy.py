"""Hospital side in deployment: the ClientApp a hospital's ``flower-supernode`` runs.

What the hospital decides is in its node config (``--node-config``), never in the server's
run config:

    data='/srv/archive'            its images: a DICOM folder with labels.csv (as
                                   ``fedtwin hospitals make`` writes, with hospital.json),
                                   or a MedMNIST-format .npz
    ledger='/srv/ledger.sqlite'    its privacy ledger (fedtwin.ledger)
    epsilon=10.0                   its budget over everything it ever releases
    delta=1e-5                     (optional; default the run's privacy.delta)
    name='hospital-0'              (optional; default from hospital.json or the file name)
    dp=true                        (optional; only a node config can turn DP off)

The run's other settings (model, rounds, local steps, batch size) come from the server.
The budget comes only from here; the server cannot raise it or switch DP off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context

from fedtwin.client.client_app import ledger_from_node_config, make_client_app
from fedtwin.config import check_config, config_from_run

if TYPE_CHECKING:
    from fedtwin.data import Hospital

REQUIRED = ("data", "ledger", "epsilon")


def hospital_config(context: Context) -> dict:
    """The run's settings with the hospital's own privacy budget from its node config."""
    node = context.node_config
    missing = [k for k in REQUIRED if k not in node]
    if missing:
        raise ValueError(
            f"node config lacks {', '.join(missing)}: start flower-supernode with "
            f"--node-config \"data='/path/archive' ledger='/path/ledger.sqlite' epsilon=10.0\""
        )
    cfg = config_from_run(context.run_config)
    privacy = {
        **cfg["privacy"],
        "enabled": bool(node.get("dp", True)),
        "epsilon": float(node["epsilon"]),
        "delta": float(node.get("delta", cfg["privacy"]["delta"])),
    }
    cfg = {**cfg, "privacy": privacy}
    check_config(cfg)  # the node's own budget too
    return cfg


def load_site(context: Context) -> Hospital:
    node, cfg = context.node_config, config_from_run(context.run_config)
    return load_archive(
        str(node["data"]),
        str(node.get("name", "")),
        int(cfg["data"]["image_size"]),
        float(cfg["federation"]["holdout_fraction"]),
        n_classes=len(cfg["data"]["classes"]),
    )


@functools.lru_cache(maxsize=2)
def load_archive(
    data: str, name: str, image_size: int, holdout_fraction: float, n_classes: int | None = None
) -> Hospital:
    """The hospital's images and its fixed holdout (the same at every start)."""
    from fedtwin.data import load_npz, split_hospital  # imported by the messages that need
    from fedtwin.ingest import ingest  # the images, not by SecAgg+'s key messages

    path = Path(data)
    if path.is_dir():
        result = ingest(path, image_size, n_classes=n_classes)
        print(f"fedtwin: {result.summary()}", file=sys.stderr)
        info_path = path / "hospital.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        name = name or str(info.get("name", path.name))
        fraction = float(info.get("holdout_fraction", holdout_fraction))
        seed = int(info.get("holdout_seed", _seed(name)))
        return split_hospital(name, result.data, fraction, seed)
    if path.suffix == ".npz":
        name = name or path.stem
        return split_hospital(name, load_npz(path, "train"), holdout_fraction, _seed(name))
    raise FileNotFoundError(
        f"node config data={data!r}: expected a DICOM folder with labels.csv or a .npz file"
    )


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


client_app = make_client_app(hospital_config, load_site, ledger_from_node_config)
