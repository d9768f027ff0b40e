"""The official MedMNIST files: where they are published, and a checksum-verified download
into a local cache that never fetches twice and says clearly what to do when offline.

Each dataset's files (one per image size MedMNIST+ publishes: 28, 64, 128, 224 px) are
listed with their MD5 in its config, ``conf/data/<name>.yaml`` (``data.sources``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedtwin.cache import cache_dir
from fedtwin.data import DataError

_DOWNLOAD_TIMEOUT_S = 60
_MD5 = re.compile(r"[0-9a-f]{32}")


def datasets() -> list[str]:
    """The datasets shipped with a config: the names of ``conf/data/*.yaml``."""
    folder = resources.files("fedtwin.conf") / "data"
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def dataset_config(name: str) -> dict[str, Any]:
    """The ``data`` section of the run config with ``data=<name>``: its sources, classes, ..."""
    from fedtwin.config import load_config  # Hydra is loaded only when a name is looked up

    known = datasets()
    if name not in known:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(known)}")
    return load_config([f"data={name}"])["data"]


def file_name(name: str, size: int) -> str:
    """The official file of dataset ``name`` at ``size`` px: ``<name>.npz`` at 28 px (as
    MedMNIST v2 named it), else ``<name>_<size>.npz``."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def published_sizes(data: Mapping[str, Any]) -> list[int]:
    """The image sizes the ``data`` section lists official files for, smallest first."""
    return sorted(_sources(data))


def _sources(data: Mapping[str, Any]) -> dict[int, Mapping[str, str]]:
    # A config read back from JSON has its keys as strings ("28").
    return {int(size): entry for size, entry in (data.get("sources") or {}).items()}


def source(data: Mapping[str, Any], size: int) -> tuple[str, str]:
    """``(url, md5)`` of the official file of ``data.name`` at ``size`` px (``data.sources``)."""
    name, sources = data["name"], _sources(data)
    sizes = sorted(sources)
    if not sizes:
        raise DataError(
            f"data.sources is empty for {name!r}, so there is nothing to download; choose a "
            f"dataset with data=<name> (one of {', '.join(datasets())}) or pass "
            f"data.path=/path/to/{name}.npz"
        )
    if size not in sizes:
        raise DataError(
            f"MedMNIST publishes {name} at {', '.join(map(str, sizes))} px, not {size}; "
            "choose one of these sizes (fedtwin data download --size), or pass "
            "data.path=/path/to/a.npz"
        )
    entry = sources[size]
    url, md5 = str(entry.get("url") or ""), str(entry.get("md5") or "").lower()
    if not url or not _MD5.fullmatch(md5):
        raise DataError(
            f"data.sources.{size} of {name} needs a url and an md5 of 32 hex digits, got "
            f"url={url!r}, md5={md5!r}; copy them from conf/data/{name}.yaml"
        )
    return url, md5


def md5sum(path: Path) -> str:
    """Hex MD5 of a file, read in chunks (MedMNIST publishes MD5s)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    data: Mapping[str, Any], cache: Path, *, size: int | None = None, progress: bool = True
) -> Path:
    """Fetch the official file of ``data.name`` at ``size`` px (default ``data.image_size``)
    into ``cache``; return its path. ``data`` is the run config's ``data`` section.

    A cached file whose MD5 matches is returned without touching the network. A download
    goes to a temporary file in ``cache``, is checked, and only then renamed into place, so
    an interrupted or corrupted download never looks like a good cached file.
    """
    name = data["name"]
    size = int(data["image_size"]) if size is None else size
    url, md5 = source(data, size)
    cache = Path(cache)
    target = cache / file_name(name, size)
    cached = md5sum(target) if target.is_file() else None
    if cached == md5:
        return target
    if cache.exists() and not cache.is_dir():
        raise DataError(
            f"the download cache {cache} is a file, not a folder: set data.cache_dir or "
            f"$FEDTWIN_CACHE to a folder (or move that file away), or pass "
            f"data.path=/path/to/{target.name}"
        )
    offline_hint = _offline_hint(target, cached, md5)
    tmp = cache / f".{target.stem}.{os.getpid()}.part"  # per process: parallel runs don't collide
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            _fetch(url, out, target.stem, progress)
        got = md5sum(tmp)
        if got != md5:
            raise DataError(
                f"download of {target.stem} from {url} has MD5 {got}, expected {md5}; the file "
                f"was removed. Try again later. {offline_hint}"
            )
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        # HTTPError's str() carries the status code; URLError's reason is the socket error.
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise DataError(
            f"cannot download {target.stem} from {url} ({reason}): no network? {offline_hint}"
        ) from e
    except OSError as e:
        raise DataError(
            f"cannot save the download of {target.stem} in {cache} ({e}); set data.cache_dir "
            f"or $FEDTWIN_CACHE to a writable folder. {offline_hint}"
        ) from e
    finally:
        with contextlib.suppress(OSError):  # in a cache that is a file there is no .part
            tmp.unlink(missing_ok=True)
    return target


def _offline_hint(target: Path, cached: str | None, md5: str) -> str:
    """What to do when the official file cannot be downloaded into ``target``, whose cached
    copy has MD5 ``cached`` (None: there is none)."""
    put = f"put the MedMNIST file at {target} or pass data.path=/path/to/{target.name}"
    if cached is None:
        return put[0].upper() + put[1:]
    return (
        f"The file already at {target} is not the published one (MD5 {cached}, expected {md5}: "
        f"damaged, or another release): remove it, then {put}"
    )


def _fetch(url: str, out, name: str, progress: bool) -> None:
    # No browser User-Agent on purpose: Zenodo refuses scripts that pretend to be browsers.
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))


def resolve_data_path(data: Mapping[str, Any], *, progress: bool = True) -> Path:
    """The npz to use for the run config's ``data`` section: ``data.path`` if given (it
    must exist), else the cached or downloaded official file: the one at ``data.image_size``,
    or, when MedMNIST publishes no file of that size, the smallest larger one (images are
    resized after loading), else the largest."""
    if data.get("path"):
        given = Path(data["path"]).expanduser()
        if not given.exists():
            raise DataError(
                f"data.path={given}: no such file or folder; give an existing MedMNIST .npz "
                "or DICOM folder, or leave data.path unset to use the download"
            )
        if not (given.is_file() or given.is_dir()):
            raise DataError(
                f"data.path={given}: not a regular file or folder (a device, pipe or socket); "
                "give a MedMNIST .npz or DICOM folder"
            )
        return given
    wanted, sizes = int(data["image_size"]), published_sizes(data)
    size = next((s for s in sizes if s >= wanted), sizes[-1] if sizes else wanted)
    return download(data, cache_dir(data.get("cache_dir")), size=size, progress=progress)
