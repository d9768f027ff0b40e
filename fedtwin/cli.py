"""The ``fedtwin`` command line: one sub-command per job of the people who use it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EPILOG = """examples:
  fedtwin demo --out runs/demo                         # the whole pipeline, simulated hospitals
  fedtwin demo --out runs/tiny +experiment=tiny        # a one-minute run
  fedtwin demo --out runs/x federation.rounds=5 privacy.epsilon=4 data.path=my.npz
  fedtwin hospitals make --source data.npz --hospitals 4 --alpha 0.5 --out archives
  fedtwin ingest archives/hospital-0                   # check what a hospital archive yields
  fedtwin data download                                # fetch PneumoniaMNIST into the cache
  fedtwin verify runs/demo/twin --public-key runs/demo/keys/consortium-signing.pem.pub
  fedtwin pki signing-key --out keys/consortium-signing.pem
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

    hospitals = sub.add_parser("hospitals", help="hospital archives for trials and tests")
    hsub = hospitals.add_subparsers(dest="action", required=True)
    make = hsub.add_parser("make", help="split a MedMNIST .npz into per-hospital DICOM archives")
    make.add_argument("--source", required=True, type=Path, help="MedMNIST-format .npz")
    make.add_argument("--hospitals", type=int, default=4)
    make.add_argument("--partition", choices=["iid", "dirichlet"], default="dirichlet")
    make.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    make.add_argument("--holdout", type=float, default=0.2, help="holdout fraction per hospital")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", required=True, type=Path)

    ingest = sub.add_parser("ingest", help="read a DICOM folder or .npz the way a client does")
    ingest.add_argument("path", type=Path)
    ingest.add_argument("--image-size", type=int, default=28)

    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="action", required=True)
    download = dsub.add_parser("download", help="download a MedMNIST dataset into the cache")
    download.add_argument("--name", default="pneumoniamnist")
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

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"fedtwin {args.command}: error: {e}", file=sys.stderr)
        return 2


def cmd_demo(args) -> int:
    from fedtwin.config import load_config
    from fedtwin.demo import run_demo

    cfg = load_config(args.overrides)
    summary = run_demo(cfg, args.out)
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
    return 0


def cmd_hospitals(args) -> int:
    from fedtwin.dicom import make_hospital_archives

    dirs = make_hospital_archives(
        args.source, args.hospitals, args.partition, args.alpha, args.holdout, args.seed, args.out
    )
    for d in dirs:
        print(d)
    return 0


def cmd_ingest(args) -> int:
    from fedtwin.dicom import ingest

    result = ingest(args.path, args.image_size, progress=True)
    print(result.summary())
    for name, reason in result.skipped:
        print(f"  skipped {name}: {reason}")
    return 0


def cmd_data(args) -> int:
    from fedtwin.data import cache_dir, download

    print(download(args.name, cache_dir(args.cache)))
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


COMMANDS = {
    "demo": cmd_demo,
    "hospitals": cmd_hospitals,
    "ingest": cmd_ingest,
    "data": cmd_data,
    "verify": cmd_verify,
    "pki": cmd_pki,
}

if __name__ == "__main__":
    sys.exit(main())
