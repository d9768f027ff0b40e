"""``fedtwin review``: the reader study's commands.

At a hospital:
  serve    make the study (on first start) and serve it to the hospital's readers
  summary  the counts that leave the hospital (printed, and written to --out)
At the consortium:
  pool     pool the hospitals' summaries; optionally into the twin's manifest, signed again
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"


def add_parser(sub) -> None:
    review = sub.add_parser("review", help="the reader study: clinicians read real vs twin images")
    rsub = review.add_subparsers(dest="action", required=True)

    serve = rsub.add_parser("serve", help="serve the study to this hospital's readers")
    serve.add_argument("--db", required=True, type=Path, help="the study's SQLite file")
    serve.add_argument("--twin", type=Path, help="the twin's folder (needed to make the study)")
    serve.add_argument(
        "--data", help="this hospital's images: a DICOM folder with labels.csv, or a .npz"
    )
    serve.add_argument("--images", type=int, default=40, help="images per study (half real)")
    serve.add_argument("--seed", type=int, help="which images are chosen (default: random)")
    serve.add_argument("--host", default=LOOPBACK, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow an address other than loopback: readers then log in with an access code",
    )
    serve.add_argument("--access-code-file", type=Path, help="the access code (default: new)")
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, help="... and its key")

    summary = rsub.add_parser("summary", help="the counts this hospital sends (no images)")
    summary.add_argument("--db", required=True, type=Path)
    summary.add_argument("--hospital", required=True, help="this hospital's name")
    summary.add_argument("--out", required=True, type=Path)

    pool = rsub.add_parser("pool", help="pool the hospitals' summaries (consortium)")
    pool.add_argument("summaries", nargs="+", type=Path)
    pool.add_argument("--out", required=True, type=Path, help="the pooled figures (JSON)")
    pool.add_argument("--twin", type=Path, help="also record them in this twin's manifest ...")
    pool.add_argument("--signing-key", type=Path, help="... and sign it again with this key")


def cmd_review(args) -> int:
    return {"serve": _serve, "summary": _summary, "pool": _pool}[args.action](args)


def _serve(args) -> int:
    import uvicorn

    from fedtwin.review.app import make_app
    from fedtwin.review.store import Study

    code, hosts = access(args.host, args.allow_remote, args.access_code_file)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("give both --tls-cert and --tls-key, or neither")
    existed = args.db.exists()
    study = Study(args.db) if existed else _make_study(args)
    if args.twin and existed:
        _check_same_twin(study, args.twin)
    scheme = "https" if args.tls_cert else "http"
    images = study.counts()["images"]
    print(f"fedtwin review: {args.db}: {images['real']} real and {images['twin']} twin images, "
          "as many of each per class", flush=True)  # fmt: skip
    if sum(images.values()) < args.images:
        print(f"fedtwin review: fewer than --images {args.images}: some class has too few real "
              "or twin images", flush=True)  # fmt: skip
    print(f"fedtwin review: readers open {scheme}://{args.host}:{args.port}/", flush=True)
    if code and not args.access_code_file:
        print(f"fedtwin review: access code: {code}", flush=True)
    app = make_app(study, code, secure_cookie=bool(args.tls_cert), allowed_hosts=hosts)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
    )
    return 0


def access(host: str, allow_remote: bool, code_file: Path | None) -> tuple[str | None, list]:
    """The access code readers must give (None: none) and the host names the app answers.

    On 127.0.0.1 (the default) the app answers only for 127.0.0.1 and localhost, and asks
    for a code only if ``code_file`` gives one. Any other address serves the hospital's
    real images beyond this machine: only with ``allow_remote``, and always with a code.
    """
    from fedtwin.review.app import LOCAL_HOSTS

    remote = not ipaddress.ip_address(_host_ip(host)).is_loopback
    if remote and not allow_remote:
        raise ValueError(
            f"--host {host}: this serves the hospital's real images beyond this machine; "
            "pass --allow-remote to do so (readers then need the access code), preferably with "
            "--tls-cert/--tls-key"
        )
    code = _access_code(code_file) if remote or code_file else None
    hosts = ["*"] if remote else sorted({*LOCAL_HOSTS, host})  # "*": the code guards it
    return code, hosts


def _host_ip(host: str) -> str:
    if host == "localhost":
        return LOOPBACK
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--host {host!r}: give an IP address to bind, e.g. 127.0.0.1") from None
    return host


def _access_code(path: Path | None) -> str:
    if path is None:
        return secrets.token_urlsafe(9)
    code = path.read_text().strip()
    if len(code) < 8:
        raise ValueError(f"{path}: the access code must be at least 8 characters")
    return code


def _twin(twin: Path) -> tuple[dict, str, tuple]:
    """The twin's manifest, the sha256 of its images.npz (what names the twin) and its
    images and labels."""
    import numpy as np

    from fedtwin.signing import sha256_file

    manifest_path, npz = twin / "manifest.json", twin / "images.npz"
    for path in (manifest_path, npz):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; --twin is a twin's folder")
    try:
        manifest = json.loads(manifest_path.read_text())
        cfg = manifest["config"]  # what making the study reads:
        _ = cfg["data"]["image_size"], cfg["data"]["classes"], cfg["federation"]["holdout_fraction"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path}: not a fedtwin twin's manifest ({e!r})") from None
    try:
        with np.load(npz) as z:
            images, labels = z["train_images"], z["train_labels"].reshape(-1)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{npz}: not a twin's images (train_images, train_labels): {e}") from None
    return manifest, sha256_file(npz), (images, labels)


def _check_same_twin(study, twin: Path) -> None:
    from fedtwin.signing import sha256_file

    if sha256_file(twin / "images.npz") != study.meta("twin_images_sha256"):
        raise ValueError(
            f"{study.path} is a study of another twin than {twin}; give a new --db for this one"
        )


def _make_study(args):
    import numpy as np

    from fedtwin.client.site import load_archive
    from fedtwin.review.store import Study

    if args.twin is None or args.data is None:
        raise ValueError(f"{args.db} does not exist: give --twin and --data to make the study")
    manifest, sha, twin = _twin(args.twin)
    data = manifest["config"]["data"]
    hospital = load_archive(
        args.data,
        "",
        int(data["image_size"]),
        float(manifest["config"]["federation"]["holdout_fraction"]),
        n_classes=len(data["classes"]),
        channels=int(data.get("channels", 1)),
    )
    real = (
        np.concatenate([hospital.train.images, hospital.holdout.images]),
        np.concatenate([hospital.train.labels, hospital.holdout.labels]),
    )
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    return Study.create(args.db, real, twin, data["classes"], args.images, seed, sha)


def _summary(args) -> int:
    from fedtwin.jsonio import write_json
    from fedtwin.review.stats import aggregate
    from fedtwin.review.store import Study

    agg = aggregate(Study(args.db), args.hospital)
    write_json(args.out, agg)
    print(json.dumps(agg, indent=1))
    print(f"fedtwin review: this is all that leaves the hospital: {args.out}", file=sys.stderr)
    if agg["readers"] < 2:
        print(
            f"fedtwin review: {agg['readers']} reader: these counts are that reader's own "
            "performance, under the hospital's name; consider waiting for more readers",
            file=sys.stderr,
        )
    return 0


def _pool(args) -> int:
    from fedtwin.jsonio import write_json
    from fedtwin.review.stats import check_aggregate, pool

    if args.out.suffix.lower() != ".json":
        raise ValueError(f"--out {args.out}: give a .json path (the page goes beside it, .html)")
    aggregates = []
    for path in args.summaries:
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        aggregates.append(check_aggregate(raw, str(path)))
    pooled = pool(aggregates)
    write_json(args.out, pooled)
    page = args.out.with_suffix(".html")
    page.write_text(render_pooled(pooled))
    a = pooled["all"]
    low, high = a["accuracy_ci95"]
    print(
        f"fedtwin review: {pooled['readers']} reader(s) at {pooled['hospitals']} hospital(s), "
        f"{a['readings']} readings: real vs synthetic accuracy "
        f"{a['real_vs_synthetic_accuracy']:.2f} "
        f"(95 % CI {low:.2f}-{high:.2f}; 0.5 = cannot tell), realism real {a['realism_real']:.2f} "
        f"vs twin {a['realism_twin']:.2f}"
    )
    print(f"fedtwin review: figures per class and per hospital: {args.out}, {page}")
    if args.twin:
        from fedtwin.review.attach import attach

        attach(args.twin, pooled, args.signing_key)
        print(f"fedtwin review: recorded in {args.twin / 'manifest.json'}")
    return 0


def render_pooled(pooled: dict) -> str:
    """The pooled reader study as an HTML page (the report's reader-study section)."""
    import math

    from fedtwin.review.app import TEMPLATES

    def fmt(v) -> str:
        return "–" if v is None or math.isnan(v) else f"{v:.2f}"

    return TEMPLATES.get_template("pooled.html").render(p=pooled, fmt=fmt)
