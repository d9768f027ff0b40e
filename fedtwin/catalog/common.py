"""What the catalog server and client agree on: message sizes, names, folders."""

from __future__ import annotations

import re
from pathlib import Path

# Chunks are 1 MiB; the largest unary message is GetManifest, whose manifest lists every
# file's sha256 (about 100 bytes per file: a 20k-image twin's is about 4 MiB).
MAX_MESSAGE = 32 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
SERVICE = "fedtwin.catalog.v1.TwinCatalog"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(value: str, field: str) -> str:
    """A twin name or version: letters, digits, ``.``, ``_``, ``-``; at most 64."""
    if not _NAME.match(value):
        raise ValueError(
            f"{field} {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit"
        )
    return value


def check_folder(path: Path) -> Path:
    """``path`` is a folder or can be made one: it, or else its nearest existing parent, is
    a folder. Raises ValueError naming the file in the way."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            return path
        if p.exists() or p.is_symlink():
            where = f"{path}: " if p != path else ""
            raise ValueError(f"{where}{p} is a file, not a folder; choose another path")
    return path


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME[:VERSION]`` -> (name, version); version empty means the latest."""
    name, _, version = ref.partition(":")
    check_name(name, "twin name")
    if version:
        check_name(version, "version")
    return name, version
