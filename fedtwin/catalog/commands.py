"""The catalog's commands: ``fedtwin catalog serve|publish`` (the operator), ``fedtwin twins``
and ``fedtwin pull`` (a researcher); a gRPC error is one line with a hint, not a traceback."""

from __future__ import annotations

import logging
import sys


def _stub(args):
    from fedtwin.catalog.client import Identity, connect

    if args.ca is None or args.cert is None:
        raise ValueError("give --ca and --cert (or set FEDTWIN_CA and FEDTWIN_CERT)")
    key = args.key or args.cert.with_suffix(".key")
    return connect(Identity(args.catalog, args.ca, args.cert, key))


def _rpc_error(command: str, e) -> int:
    import grpc

    hint = ""
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        hint = (
            " (is the catalog running at that address, and are --ca/--cert/--key from the "
            "consortium's PKI?)"
        )
    elif e.code() == grpc.StatusCode.CANCELLED and command == "pull":
        hint = " (the catalog ends a pull that takes no data for a while; run it again to resume)"
    print(f"fedtwin {command}: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
    return 3


def cmd_catalog(args) -> int:
    import grpc

    from fedtwin.signing import load_public_key

    if args.action == "serve":
        from fedtwin.catalog.server import serve

        logging.getLogger("fedtwin").setLevel(logging.INFO)
        serve(
            args.root,
            args.address,
            ca=args.pki / "ca.pem",
            cert=args.pki / f"{args.name}.pem",
            key=args.pki / f"{args.name}.key",
            signing_key=load_public_key(args.signing_key),
            streams_per_peer=args.streams_per_peer,
            stall_s=args.stall_timeout,
        )
        return 0
    from fedtwin.catalog.client import publish

    try:
        s = publish(_stub(args), args.twin, args.name, args.version, args.modality, True)
    except grpc.RpcError as e:
        return _rpc_error("catalog publish", e)
    print(f"published {s.name}:{s.version}: {s.images} images, {s.size_bytes} bytes")
    return 0


def cmd_twins(args) -> int:
    import grpc

    from fedtwin.catalog.client import list_twins

    try:
        twins = list_twins(_stub(args))
    except grpc.RpcError as e:
        return _rpc_error("twins", e)
    if not twins:
        print("the catalog has no twins yet")
    for t in twins:
        eps = f"eps {t.epsilon_max:.2f} delta {t.delta:g}" if t.epsilon_max >= 0 else "no DP"
        print(
            f"{t.name}:{t.version}  {t.images} images  {t.size_bytes / 1e6:.1f} MB  {eps}  "
            f"audit {t.audit_verdict}  {t.modality}  published {t.published_at}"
        )
    return 0


def cmd_pull(args) -> int:
    import grpc

    from fedtwin.catalog.client import TwinRejected, pull
    from fedtwin.catalog.common import parse_ref
    from fedtwin.signing import load_public_key

    name, version = parse_ref(args.twin)
    key = load_public_key(args.public_key) if args.public_key else None
    try:
        result = pull(
            _stub(args),
            name,
            version,
            args.out,
            trusted=key,
            limit_rate=args.limit_rate,
            progress=True,
        )
    except grpc.RpcError as e:
        return _rpc_error("pull", e)
    except TwinRejected as e:
        print(f"fedtwin pull: REFUSED: {e}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"note: {note}")
    print(f"OK: {args.out}: signature and {result.files_checked} files check out")
    return 0
