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

from fedtwin.ranges import SEED, whole

LOOPBACK = "127.0.0.1"
PORT = whole(1, 65_535)  # 0 (any free port) is not offered: readers must be told the port
MAX_SUMMARY_BYTES = 1 << 20  # a hospital's summary is counts per class: a few KiB
MAX_PEM_BYTES = 1 << 20  # a certificate chain or a key: a few KiB


def add_parser(sub) -> None:
    review = sub.add_parser("review", help="the reader study: clinicians read real vs twin images")
    rsub = review.add_subparsers(dest="action", required=True)

    serve = rsub.add_parser("serve", help="serve the study to this hospital's readers")
    serve.add_argument("--db", required=True, type=Path, help="the study's SQLite file")
    serve.add_argument("--twin", type=Path, help="the twin's folder (needed to make the study)")
    serve.add_argument(
        "--data", help="this hospital's images: a DICOM folder with labels.csv, or a .npz"
    )
    serve.add_argument(
        "--images", type=whole(2, 100_000).argument, default=40, help="images per study (half real)"
    )
    serve.add_argument(
        "--seed", type=SEED.argument, help="which images are chosen (default: random)"
    )
    serve.add_argument("--host", default=LOOPBACK, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=PORT.argument, default=8765, help="1-65535 (default 8765)")
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
    summary.add_argument(
        "--hospital", required=True, type=_hospital, help="this hospital's name (1-100 characters)"
    )
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
    check_tls(args.tls_cert, args.tls_key)  # before a study is made
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
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
    print(f"fedtwin review: readers open {scheme}://{host}:{args.port}/", flush=True)
    if code and not args.access_code_file:
        print(f"fedtwin review: access code: {code}", flush=True)
    app = make_app(study, code, secure_cookie=bool(args.tls_cert), allowed_hosts=hosts)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        proxy_headers=False,  # no proxy: the client address counts wrong codes, not a header
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


def check_tls(cert: Path | None, key: Path | None) -> None:
    """Refuse, naming the file, a certificate or key the server could not serve HTTPS with:
    missing, not PEM, an encrypted key, or a key that is not the certificate's."""
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if bool(cert) != bool(key):
        raise ValueError("give both --tls-cert and --tls-key, or neither")
    if cert is None or key is None:
        return
    _load_pem("--tls-cert", cert, "certificate", x509.load_pem_x509_certificate)
    _load_pem("--tls-key", key, "private key", lambda b: load_pem_private_key(b, password=None))
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise ValueError(
            f"--tls-key {key} is not the key of --tls-cert {cert} ({e.reason}); give the pair"
        ) from None


def _load_pem(option: str, path: Path, what: str, load) -> None:
    if not path.is_file():
        raise ValueError(f"{option} {path}: no such file; give the PEM {what}")
    if path.stat().st_size > MAX_PEM_BYTES:
        raise ValueError(f"{option} {path}: over {MAX_PEM_BYTES >> 20} MiB, not a PEM {what}")
    try:
        load(path.read_bytes())
    except TypeError:  # cryptography: a password is needed
        raise ValueError(
            f"{option} {path}: the {what} is encrypted; give it unencrypted, readable only by "
            "the account that serves the study"
        ) from None
    except ValueError as e:
        raise ValueError(f"{option} {path}: not a PEM {what} ({e})") from None


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
        data = manifest["config"]["data"]  # what making the study reads:
        _ = int(data["image_size"]), len(data["classes"]), int(data.get("channels", 1))
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
    from fedtwin.review.store import Study

    if args.twin is None or args.data is None:
        raise ValueError(f"{args.db} does not exist: give --twin and --data to make the study")
    manifest, sha, twin = _twin(args.twin)
    data = manifest["config"]["data"]
    real = _hospital_images(args.data, args.twin, data)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    return Study.create(args.db, real, twin, data["classes"], args.images, seed, sha)


def _hospital_images(path: str, twin: Path, data: dict) -> tuple:
    """The hospital's images ``(N, S, S)`` (colour: ``(..., 3)``) and labels ``(N,)``, read
    as ``fedtwin ingest`` reads them for the twin's dataset (``data``: its classes, channels
    and size); raises DataError naming the archive when it does not fit the twin."""
    from fedtwin.data import DataError
    from fedtwin.ingest import ingest

    size, classes, channels = int(data["image_size"]), data["classes"], int(data.get("channels", 1))
    kind = "colour" if channels == 3 else "grey"
    twin_is = f"the twin {twin} ({len(classes)} classes {classes}, {kind}, {size} x {size})"
    try:
        result = ingest(Path(path), size, n_classes=len(classes), channels=channels)
    except DataError as e:
        raise DataError(f"--data for {twin_is}: {e}") from None
    print(f"fedtwin review: {result.summary()}", file=sys.stderr)
    if result.used == 0:
        raise DataError(f"--data {path}: no image fits {twin_is}; see why above")
    return result.data.images, result.data.labels


def _hospital(text: str) -> str:
    """An argparse type: a hospital's name as a summary may carry it (what ``pool`` takes)."""
    import argparse

    from fedtwin.review.names import is_name
    from fedtwin.review.stats import MAX_NAME

    if not is_name(text, MAX_NAME):
        raise argparse.ArgumentTypeError(f"{text!r}: 1 to {MAX_NAME} printable characters")
    return text


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
    from fedtwin.review.stats import pool

    if args.out.suffix.lower() != ".json":
        raise ValueError(f"--out {args.out}: give a .json path (the page goes beside it, .html)")
    summaries = [(str(path), _read_summary(path)) for path in args.summaries]
    update = None
    if args.twin:  # every check before anything is written
        from fedtwin.review.attach import prepare, record

        update = prepare(args.twin, summaries, args.signing_key)
    pooled = pool([agg for _, agg in summaries])
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
    if update is not None:
        record(update, pooled)
        print(f"fedtwin review: recorded in {args.twin / 'manifest.json'}")
    return 0


def _read_summary(path: Path) -> dict:
    """A hospital's summary file, checked (``check_aggregate``); errors name the file."""
    from fedtwin.review.stats import check_aggregate

    if path.stat().st_size > MAX_SUMMARY_BYTES:
        raise ValueError(f"{path}: over {MAX_SUMMARY_BYTES >> 20} MiB, not a reader study summary")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSON, UTF-8 and integer-size errors
        raise ValueError(f"{path}: not JSON ({e})") from None
    return check_aggregate(raw, str(path))


def render_pooled(pooled: dict) -> str:
    """The pooled reader study as an HTML page (the report's reader-study section)."""
    import math

    from fedtwin.review.app import TEMPLATES

    def fmt(v) -> str:
        return "–" if v is None or math.isnan(v) else f"{v:.2f}"

    return TEMPLATES.get_template("pooled.html").render(p=pooled, fmt=fmt)
