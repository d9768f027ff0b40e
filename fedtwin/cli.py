"""The ``fedtwin`` command line: one sub-command per job of the people who use it."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from fedtwin.catalog.commands import cmd_catalog, cmd_pull, cmd_twins
from fedtwin.ranges import SEED
from fedtwin.review import commands as review

EPILOG = """examples:
  fedtwin demo --out runs/demo                         # the whole pipeline, simulated hospitals
  fedtwin demo --out runs/tiny +experiment=tiny        # a one-minute run
  fedtwin demo --out runs/x federation.rounds=5 privacy.epsilon=4 data.path=my.npz
  fedtwin hospitals make --source data.npz --hospitals 4 --alpha 0.5 --out archives
  fedtwin ingest archives/hospital-0                   # check what a hospital archive yields
  fedtwin data download retinamnist --size 64         # fetch a MedMNIST dataset into the cache
  fedtwin verify runs/demo/twin --public-key runs/demo/keys/consortium-signing.pem.pub
  fedtwin pki signing-key --out keys/consortium-signing.pem
  fedtwin ledger show runs/demo/ledgers/hospital-0.sqlite --budget 10
  fedtwin deploy app --dir consortium-app --out runs/consortium   # then: flwr run consortium-app
  fedtwin catalog serve --root catalog --pki pki --signing-key keys/consortium-signing.pem.pub
  fedtwin twins --ca pki/ca.pem --cert pki/alice.pem   # what the catalog offers
  fedtwin pull pneumonia-twin:1 --out twins/pneumonia --ca pki/ca.pem --cert pki/alice.pem
  fedtwin review serve --db review.sqlite --twin twins/pneumonia --data /srv/archive
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedtwin",
        description="Federated, differentially private synthetic twins of imaging archives.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on one machine (simulation)")
    demo.add_argument("--out", required=True, type=Path, help="output directory")
    demo.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. federation.rounds=5")
    demo.add_argument(
        "--verbose", action="store_true", help="show Flower's log, not only a line per round"
    )

    hospitals = sub.add_parser("hospitals", help="hospital archives for trials and tests")
    hsub = hospitals.add_subparsers(dest="action", required=True)
    make = hsub.add_parser("make", help="split a MedMNIST .npz into per-hospital DICOM archives")
    make.add_argument("--source", required=True, type=Path, help="MedMNIST-format .npz")
    make.add_argument("--hospitals", type=int, default=4)
    make.add_argument("--partition", choices=["iid", "dirichlet"], default="dirichlet")
    make.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    make.add_argument("--holdout", type=float, default=0.2, help="holdout fraction per hospital")
    make.add_argument("--seed", type=SEED.argument, default=0)
    make.add_argument("--out", required=True, type=Path)
    make.add_argument(
        "--force", action="store_true", help="replace hospital-N archives already in --out"
    )

    ingest = sub.add_parser("ingest", help="read a DICOM folder or .npz the way a client does")
    ingest.add_argument("path", type=Path)
    ingest.add_argument("--image-size", type=_positive(int), default=28)
    ingest.add_argument(
        "--classes", type=_positive(int), help="number of classes (default: the dataset's)"
    )
    ingest.add_argument(
        "--data",
        default="pneumoniamnist",
        help="the dataset config (conf/data/<name>.yaml) whose classes and channels to expect",
    )

    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="action", required=True)
    download = dsub.add_parser("download", help="download a MedMNIST dataset into the cache")
    download.add_argument(
        "name", nargs="?", default="pneumoniamnist", help="dataset: a conf/data/<name>.yaml"
    )
    download.add_argument(
        "--size",
        type=_positive(int),
        help="image size: 28, 64, 128 or 224 (default: data.image_size, 28)",
    )
    download.add_argument("--cache", default=None, help="cache directory")

    verify = sub.add_parser("verify", help="check a twin's signature and every file's sha256")
    verify.add_argument("twin", type=Path, help="twin directory (with manifest.json)")
    verify.add_argument(
        "--public-key", type=Path, help="the consortium's Ed25519 public key (PEM) to trust"
    )

    pki = sub.add_parser("pki", help="the consortium's keys and certificates")
    psub = pki.add_subparsers(dest="action", required=True)
    pinit = psub.add_parser("init", help="make the consortium CA")
    pinit.add_argument("--dir", required=True, type=Path, help="PKI directory")
    pserver = psub.add_parser("server", help="TLS certificate of a server (SuperLink, catalog)")
    pserver.add_argument("--dir", required=True, type=Path)
    pserver.add_argument("--name", required=True, help="file stem, e.g. superlink")
    pserver.add_argument(
        "--host", action="append", required=True, help="DNS name or IP (repeat for several)"
    )
    pcert = psub.add_parser("cert", help="client certificate with a role (mutual TLS)")
    pcert.add_argument("--dir", required=True, type=Path)
    pcert.add_argument("--name", required=True, help="who it is for, e.g. alice")
    pcert.add_argument("--role", required=True, choices=["operator", "hospital", "researcher"])
    pnode = psub.add_parser("node", help="a hospital's SuperNode authentication key pair")
    pnode.add_argument("--dir", required=True, type=Path)
    pnode.add_argument("--name", required=True, help="hospital name, e.g. hospital-0")
    skey = psub.add_parser("signing-key", help="make the consortium's Ed25519 twin-signing key")
    skey.add_argument("--out", required=True, type=Path, help="private key path (PEM, 0600)")

    deploy = sub.add_parser("deploy", help="deployment over Flower (SuperLink, SuperNodes)")
    dsub2 = deploy.add_subparsers(dest="action", required=True)
    dapp = dsub2.add_parser("app", help="write the Flower app folder that `flwr run` starts")
    dapp.add_argument("--dir", required=True, type=Path, help="app folder (gets pyproject.toml)")
    dapp.add_argument("--out", required=True, type=Path, help="the run's output folder")
    dapp.add_argument(
        "--overrides", default="", help="Hydra overrides of the run, e.g. 'federation.rounds=20'"
    )

    ledger = sub.add_parser("ledger", help="a hospital's privacy ledger")
    lsub = ledger.add_subparsers(dest="action", required=True)
    lshow = lsub.add_parser("show", help="every release, the epsilon spent, refusals")
    lshow.add_argument("path", type=Path, help="the ledger (SQLite file)")
    lshow.add_argument(
        "--budget", type=_positive(float), help="the hospital's epsilon budget, to compare"
    )
    lshow.add_argument("--delta", type=float, help="default: the delta it was recorded at")

    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument(
        "--catalog",
        default=os.environ.get("FEDTWIN_CATALOG", "127.0.0.1:50051"),
        help="catalog address host:port (env FEDTWIN_CATALOG; default 127.0.0.1:50051)",
    )
    conn.add_argument(
        "--ca", type=Path, default=_env_path("FEDTWIN_CA"), help="consortium CA (env FEDTWIN_CA)"
    )
    conn.add_argument(
        "--cert",
        type=Path,
        default=_env_path("FEDTWIN_CERT"),
        help="your client certificate (env FEDTWIN_CERT)",
    )
    conn.add_argument(
        "--key", type=Path, default=_env_path("FEDTWIN_KEY"), help="its key (default: CERT.key)"
    )

    catalog = sub.add_parser("catalog", help="run the twin catalog; publish twins to it")
    csub = catalog.add_subparsers(dest="action", required=True)
    serve = csub.add_parser("serve", help="serve the catalog over mutual TLS")
    serve.add_argument("--root", required=True, type=Path, help="catalog storage directory")
    serve.add_argument("--address", default="127.0.0.1:50051", help="host:port (port 0: free)")
    serve.add_argument(
        "--pki", required=True, type=Path, help="PKI directory (ca.pem, NAME.pem, NAME.key)"
    )
    serve.add_argument("--name", default="catalog", help="server certificate stem in --pki")
    serve.add_argument(
        "--signing-key",
        required=True,
        type=Path,
        help="the consortium's Ed25519 public key: only twins it signed are accepted",
    )
    serve.add_argument(
        "--streams-per-peer",
        type=_positive(int),
        default=8,
        help="pulls and publishes one certificate may have open at once (default 8)",
    )
    serve.add_argument(
        "--stall-timeout",
        type=_positive(float),
        default=60.0,
        help="seconds a pull or publish may move no data before it is ended (default 60)",
    )
    cpub = csub.add_parser("publish", parents=[conn], help="upload a signed twin (operator)")
    cpub.add_argument("twin", type=Path, help="twin directory")
    cpub.add_argument("--name", required=True, help="catalog name, e.g. pneumonia-twin")
    cpub.add_argument("--version", required=True, help="e.g. 1 or 2026-11")
    cpub.add_argument(
        "--modality", default="OT", help="DICOM modality of the source images, e.g. CR"
    )

    sub.add_parser("twins", parents=[conn], help="list the catalog's twins")
    pull = sub.add_parser("pull", parents=[conn], help="download and verify a twin")
    pull.add_argument("twin", help="NAME or NAME:VERSION (default: the latest version)")
    pull.add_argument("--out", required=True, type=Path, help="new directory for the twin")
    pull.add_argument(
        "--public-key", type=Path, help="the consortium's Ed25519 public key (PEM) to trust"
    )
    pull.add_argument(
        "--limit-rate", type=_rate, help="cap the download rate, bytes/s (e.g. 500k, 2M)"
    )

    review.add_parser(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, RuntimeError) as e:  # OSError's text names the file
        print(f"fedtwin {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM in the demo (stop_on_signals)
        print(f"fedtwin {args.command}: stopped", file=sys.stderr)
        return 130


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGTERM ends the demo as Ctrl-C does, through its ``finally`` blocks,
    which end every process it started (``fedtwin.localnet.Consortium.stop``); a second
    signal meanwhile is ignored, so that the clean-up runs to its end. The handlers before
    are restored on the way out."""
    signals = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in signals}

    def stop(signum: int, frame) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for s in signals:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _env_path(name: str) -> Path | None:
    return Path(os.environ[name]) if os.environ.get(name) else None


def _positive(kind: type):
    """An argparse type: a positive ``kind`` (int or float)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
        return value

    return parse


def _rate(text: str) -> float:
    """``500k``, ``2M``, ``1000`` -> bytes per second."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes/s such as 500k or 2M") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def cmd_demo(args) -> int:
    from fedtwin.config import load_config
    from fedtwin.demo import run_demo

    cfg = load_config(args.overrides)
    with stop_on_signals():
        summary = run_demo(cfg, args.out, verbose=args.verbose)
    ev = summary["evaluation"]
    eps = ", ".join(f"{k} {v:.2f}" for k, v in summary["epsilon_per_hospital"].items())
    gate = summary["gate"]
    if gate["signed"] and not gate["override"]:
        status = "passed the privacy audit, signed"
    elif gate["signed"]:
        status = f"FAILED the privacy audit, signed by override ({gate['override']})"
    else:
        status = "FAILED the privacy audit, not signed (see twin/audit.json)"
    print(f"\ntwin: {args.out / 'twin'} ({status})\nreport: {args.out / 'report.html'}")
    print(f"epsilon per hospital (delta {summary['delta']:g}): {eps}")
    canaries = summary["audit"].get("canaries")
    if canaries:  # audit.canaries: the bound an attack proves, beside what was accounted
        print(
            f"empirical epsilon >= {canaries['epsilon_lower_bound']:.2f} (95 %, "
            f"{canaries['correct']}/{canaries['guessed']} canary guesses right; a lower "
            f"bound from an attack, not a guarantee) against accounted "
            f"{float(canaries['epsilon_accounted']):.2f}"  # "inf" with DP off
        )
    print(
        f"TSTR AUC {ev['tstr']['auc_mean']:.3f} ACC {ev['tstr']['acc_mean']:.3f} | "
        f"TRTR AUC {ev['trtr']['auc_mean']:.3f} ACC {ev['trtr']['acc_mean']:.3f} | "
        f"wall time {summary['wall_time_s']:.0f} s"
    )
    fu = summary["federated_utility"]
    print(
        f"federated utility (twin classifier on the hospitals' holdouts): "
        f"AUC {fu['auc']:.3f} ACC {fu['acc']:.3f}"
    )
    two_sample = ev["realism"]["two_sample"]
    test, floor = two_sample["twin_vs_real"], two_sample["real_vs_real_floor"]
    spectrum = ev["realism"]["spectrum"]
    print(
        f"realism: a CNN tells twin from real val images with AUC {test['auc']:.3f} "
        f"[{test['low']:.3f}, {test['high']:.3f}] (real vs real: {floor['auc']:.3f}; 0.5 = "
        f"cannot tell) | spectral distance {spectrum['distance_twin_val']:.3f} "
        f"(real floor {spectrum['distance_floor_train_val']:.3f})"
    )
    for warning in summary["quality"]["warnings"]:
        print(f"WARNING: {warning}")
    return 0


def cmd_hospitals(args) -> int:
    from fedtwin.dicom import make_hospital_archives

    dirs = make_hospital_archives(
        args.source,
        args.hospitals,
        args.partition,
        args.alpha,
        args.holdout,
        args.seed,
        args.out,
        replace=args.force,
    )
    for d in dirs:
        print(d)
    return 0


def cmd_ingest(args) -> int:
    from fedtwin.config import load_config
    from fedtwin.ingest import ingest

    data = load_config([f"data={args.data}"])["data"]
    n_classes = args.classes or len(data["classes"])
    channels = int(data.get("channels", 1))
    result = ingest(
        args.path, args.image_size, progress=True, n_classes=n_classes, channels=channels
    )
    print(result.summary())
    for name, reason in result.skipped:
        print(f"  skipped {name}: {reason}")
    return 0


def cmd_data(args) -> int:
    from fedtwin.medmnist import cache_dir, dataset_config, download

    data = dataset_config(args.name)
    print(download(data, cache_dir(args.cache or data["cache_dir"]), size=args.size))
    return 0


def cmd_verify(args) -> int:
    from fedtwin.signing import load_public_key, verify_twin

    key = load_public_key(args.public_key) if args.public_key else None
    result = verify_twin(args.twin, key)
    for note in result.notes:
        print(f"note: {note}")
    if result.ok:
        print(f"OK: {args.twin}: signature and {result.files_checked} files check out")
        return 0
    for problem in result.problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1


def cmd_pki(args) -> int:
    from fedtwin import pki
    from fedtwin.signing import make_signing_key, public_key_path

    if args.action == "signing-key":
        make_signing_key(args.out)
        print(f"private key: {args.out} (mode 0600, keep it at the operator)")
        print(f"public key:  {public_key_path(args.out)} (for everyone who verifies twins)")
    elif args.action == "init":
        print(f"CA certificate: {pki.init_ca(args.dir)} (give it to every node and client)")
        print(f"CA key: {args.dir / pki.CA_KEY} (mode 0600, keep it offline)")
    elif args.action == "server":
        cert = pki.issue_server(args.dir, args.name, args.host)
        print(f"server certificate: {cert}, key: {cert.with_suffix('.key')} (mode 0600)")
    elif args.action == "cert":
        cert = pki.issue_client(args.dir, args.name, args.role)
        print(f"{args.role} certificate: {cert}, key: {cert.with_suffix('.key')} (mode 0600)")
    else:
        key, pub = pki.make_node_keys(args.dir, args.name)
        print(f"SuperNode key: {key} (mode 0600, stays at {args.name})")
        print(f"public key: {pub} (the operator registers it at the SuperLink)")
    return 0


def cmd_deploy(args) -> int:
    from fedtwin.server.app_folder import write_app

    path = write_app(args.dir, args.out, args.overrides)
    print(f"Flower app: {path}\nstart the run with: flwr run {args.dir} <superlink-connection>")
    return 0


def cmd_ledger(args) -> int:
    import sqlite3

    from fedtwin.ledger import Ledger

    ledger = Ledger.existing(args.path, args.delta)  # read-only
    try:
        print(ledger.describe(args.budget))
    except sqlite3.Error as e:
        raise ValueError(f"{args.path}: cannot read the ledger ({e})") from None
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "hospitals": cmd_hospitals,
    "ingest": cmd_ingest,
    "data": cmd_data,
    "verify": cmd_verify,
    "pki": cmd_pki,
    "deploy": cmd_deploy,
    "ledger": cmd_ledger,
    "catalog": cmd_catalog,
    "twins": cmd_twins,
    "pull": cmd_pull,
    "review": review.cmd_review,
}

if __name__ == "__main__":
    sys.exit(main())
