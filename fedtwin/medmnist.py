"""The official MedMNIST files: where they are published, and a checksum-verified download
into a local cache that never fetches twice and says clearly what to do when offline."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from fedtwin.data import DataError

# Official MedMNIST files: name -> (url, md5). The URL and MD5 are the ones in the `medmnist`
# package's INFO dict (medmnist/info.py, v3.0.2, Zenodo record 10519652; the MD5 of the
# 28 px file is unchanged from the v2 record 6496656).
MEDMNIST: dict[str, tuple[str, str]] = {
    "pneumoniamnist": (
        "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        "28209eda62fecd6e6a2d98b1501bb15f",
    ),
}

_DOWNLOAD_TIMEOUT_S = 60


def cache_dir(configured: str | None = None) -> Path:
    """Where downloads live: ``configured``, else ``$FEDTWIN_CACHE``, else ~/.cache/fedtwin."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("FEDTWIN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedtwin"


def md5sum(path: Path) -> str:
    """Hex MD5 of a file, read in chunks (MedMNIST publishes MD5s)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(name: str, cache: Path, *, progress: bool = True) -> Path:
    """Fetch the official MedMNIST file ``name`` into ``cache``; return its path.

    A cached file whose MD5 matches is returned without touching the network. A download
    goes to a temporary file in ``cache``, is checked, and only then renamed into place, so
    an interrupted or corrupted download never looks like a good cached file.
    """
    if name not in MEDMNIST:
        raise DataError(f"unknown dataset {name!r} (data.name); known: {sorted(MEDMNIST)}")
    url, md5 = MEDMNIST[name]
    cache = Path(cache)
    target = cache / f"{name}.npz"
    if target.is_file() and md5sum(target) == md5:
        return target
    offline_hint = f"Put the MedMNIST file at {target} or pass data.path=/path/to/{name}.npz"
    tmp = cache / f".{name}.{os.getpid()}.part"  # per process: parallel runs don't collide
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            _fetch(url, out, name, progress)
        got = md5sum(tmp)
        if got != md5:
            raise DataError(
                f"download of {name} from {url} has MD5 {got}, expected {md5}; the file was "
                f"removed. Try again later. {offline_hint}"
            )
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        # HTTPError's str() carries the status code; URLError's reason is the socket error.
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise DataError(
            f"cannot download {name} from {url} ({reason}): no network? {offline_hint}"
        ) from e
    except OSError as e:
        raise DataError(
            f"cannot save the download of {name} in {cache} ({e}); set data.cache_dir or "
            f"$FEDTWIN_CACHE to a writable folder. {offline_hint}"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _fetch(url: str, out, name: str, progress: bool) -> None:
    # No browser User-Agent on purpose: Zenodo refuses scripts that pretend to be browsers.
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))


def resolve_data_path(
    path: str | None, name: str, cache_dir: str | None = None, *, progress: bool = True
) -> Path:
    """The npz to use: ``path`` if given (it must exist), else the cached or downloaded file."""
    if path:
        given = Path(path).expanduser()
        if not given.exists():
            raise DataError(
                f"data.path={given}: no such file or folder; give an existing MedMNIST .npz "
                "or DICOM folder, or leave data.path unset to use the download"
            )
        return given
    return download(name, _cache_root(cache_dir), progress=progress)


_cache_root = cache_dir  # resolve_data_path's parameter shadows the function name
