"""Tests for fedtwin.medmnist: the downloader of the official files (never touches the
network: sources are file:// URLs or a refused connection)."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedtwin import medmnist
from fedtwin.data import DataError


@pytest.fixture
def local_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A small npz registered in MEDMNIST as 'tiny', served from a file:// URL."""
    src = tmp_path / "src" / "tiny.npz"
    src.parent.mkdir()
    np.savez(src, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros(2, int))
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    monkeypatch.setitem(medmnist.MEDMNIST, "tiny", (src.as_uri(), md5))
    return src, md5


def test_official_pneumoniamnist_entry() -> None:
    url, md5 = medmnist.MEDMNIST["pneumoniamnist"]
    assert url.startswith("https://zenodo.org/") and "pneumoniamnist.npz" in url
    assert md5 == "28209eda62fecd6e6a2d98b1501bb15f"


def test_download_verifies_checksum_and_then_uses_cache(
    tmp_path: Path, local_source: tuple[Path, str]
) -> None:
    src, _ = local_source
    cache = tmp_path / "cache"
    got = medmnist.download("tiny", cache, progress=False)
    assert got == cache / "tiny.npz" and got.read_bytes() == src.read_bytes()
    src.unlink()  # a second call must not fetch again
    assert medmnist.download("tiny", cache, progress=False) == got
    assert [p.name for p in cache.iterdir()] == ["tiny.npz"]


def test_download_checksum_mismatch_removes_file(
    tmp_path: Path, local_source: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = local_source
    monkeypatch.setitem(medmnist.MEDMNIST, "tiny", (src.as_uri(), "0" * 32))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="MD5 .* expected 0{32}"):
        medmnist.download("tiny", cache, progress=False)
    assert list(cache.iterdir()) == []


def test_download_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        medmnist.download("pneumoniamnist", cache, progress=False)
    message = str(info.value)
    assert "cannot download pneumoniamnist" in message and "name resolution" in message
    assert "no network?" in message and str(cache / "pneumoniamnist.npz") in message
    assert "data.path=/path/to/pneumoniamnist.npz" in message
    assert list(cache.iterdir()) == []  # no partial file left behind


def test_download_unreachable_url_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = (tmp_path / "nowhere.npz").as_uri()
    monkeypatch.setitem(medmnist.MEDMNIST, "tiny", (missing, "0" * 32))
    with pytest.raises(DataError, match="no network"):
        medmnist.download("tiny", tmp_path / "cache", progress=False)


def test_download_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        medmnist.download("nope", tmp_path)


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDTWIN_CACHE", str(tmp_path / "env"))
    assert medmnist.cache_dir(str(tmp_path / "conf")) == tmp_path / "conf"
    assert medmnist.cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("FEDTWIN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert medmnist.cache_dir(None) == tmp_path / ".cache" / "fedtwin"


def test_resolve_data_path(tmp_path: Path, local_source: tuple[Path, str]) -> None:
    src, _ = local_source
    assert medmnist.resolve_data_path(str(src), "tiny", None) == src
    with pytest.raises(DataError, match="absent.npz"):
        medmnist.resolve_data_path(str(tmp_path / "absent.npz"), "tiny", None)
    cache = tmp_path / "cache"
    got = medmnist.resolve_data_path(None, "tiny", str(cache), progress=False)
    assert got == cache / "tiny.npz" and got.is_file()
