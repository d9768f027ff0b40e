"""Tests for fedtwin.medmnist: the downloader of the official files and the dataset configs
that list them (never touches the network: sources are file:// URLs or a refused
connection)."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedtwin import medmnist
from fedtwin.cli import main
from fedtwin.config import load_config
from fedtwin.data import DataError, load_npz

MEDMNIST_2D = {  # name: (channels, classes, task), as MedMNIST's INFO dict gives them
    "pathmnist": (3, 9, "multi-class"),
    "chestmnist": (1, 14, "multi-label, binary-class"),
    "dermamnist": (3, 7, "multi-class"),
    "octmnist": (1, 4, "multi-class"),
    "pneumoniamnist": (1, 2, "binary-class"),
    "retinamnist": (3, 5, "ordinal-regression"),
    "breastmnist": (1, 2, "binary-class"),
    "bloodmnist": (3, 8, "multi-class"),
    "tissuemnist": (1, 8, "multi-class"),
    "organamnist": (1, 11, "multi-class"),
    "organcmnist": (1, 11, "multi-class"),
    "organsmnist": (1, 11, "multi-class"),
}


def tiny_data(url: str, md5: str, size: int = 28) -> dict:
    """A ``data`` config section for a dataset 'tiny' whose one file is at ``url``."""
    return {
        "name": "tiny",
        "path": None,
        "cache_dir": None,
        "image_size": size,
        "sources": {size: {"url": url, "md5": md5}},
    }


@pytest.fixture
def local_source(tmp_path: Path) -> tuple[Path, dict]:
    """A small npz served from a file:// URL, and the 'tiny' data section that lists it."""
    src = tmp_path / "src" / "tiny.npz"
    src.parent.mkdir()
    np.savez(src, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros(2, int))
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    return src, tiny_data(src.as_uri(), md5)


def test_every_medmnist_2d_dataset_has_a_config() -> None:
    assert medmnist.datasets() == sorted([*MEDMNIST_2D, "mnist"])  # and DPImageBench's MNIST


def test_mnist_by_name_reads_a_given_file_and_says_it_has_no_download(tmp_path: Path) -> None:
    data = load_config(["data=mnist"])["data"]
    assert data["classes"] == [str(d) for d in range(10)] and data["channels"] == 1
    with pytest.raises(DataError, match="data.sources is empty for 'mnist'.*data.path="):
        medmnist.resolve_data_path({**data, "cache_dir": str(tmp_path)}, progress=False)
    given = tmp_path / "mnist_28_trainval.npz"
    given.write_bytes(b"")
    assert medmnist.resolve_data_path({**data, "path": str(given)}) == given


@pytest.mark.parametrize("name", sorted(MEDMNIST_2D))
def test_a_dataset_config_loads_with_its_channels_classes_and_sources(name: str) -> None:
    data = load_config([f"data={name}"])["data"]
    channels, n_classes, task = MEDMNIST_2D[name]
    assert (data["name"], data["channels"], len(data["classes"]), data["task"]) == (
        name,
        channels,
        n_classes,
        task,
    )
    assert len(set(data["classes"])) == n_classes and data["image_size"] == 28
    assert medmnist.published_sizes(data) == [28, 64, 128, 224]
    for size in (28, 64, 128, 224):
        url, md5 = medmnist.source(data, size)
        assert re.fullmatch(r"[0-9a-f]{32}", md5)
        assert url.startswith("https://zenodo.org/records/")
        assert f"/{medmnist.file_name(name, size)}?" in url


def test_official_pneumoniamnist_entry() -> None:
    data = medmnist.dataset_config("pneumoniamnist")
    url, md5 = medmnist.source(data, 28)
    assert url.startswith("https://zenodo.org/") and "pneumoniamnist.npz" in url
    assert md5 == "28209eda62fecd6e6a2d98b1501bb15f"
    assert data["classes"] == ["normal", "pneumonia"]


def test_sources_read_back_from_json_keep_working() -> None:
    data = json.loads(json.dumps(medmnist.dataset_config("retinamnist")))  # keys "28", ...
    assert medmnist.published_sizes(data) == [28, 64, 128, 224]
    assert medmnist.source(data, 64)[0].endswith("/retinamnist_64.npz?download=1")


def test_file_name() -> None:
    assert medmnist.file_name("bloodmnist", 28) == "bloodmnist.npz"
    assert medmnist.file_name("bloodmnist", 128) == "bloodmnist_128.npz"


def test_download_verifies_checksum_and_then_uses_cache(
    tmp_path: Path, local_source: tuple[Path, dict]
) -> None:
    src, data = local_source
    cache = tmp_path / "cache"
    got = medmnist.download(data, cache, progress=False)
    assert got == cache / "tiny.npz" and got.read_bytes() == src.read_bytes()
    src.unlink()  # a second call must not fetch again
    assert medmnist.download(data, cache, progress=False) == got
    assert [p.name for p in cache.iterdir()] == ["tiny.npz"]


def test_download_of_a_larger_size_is_named_with_it(
    tmp_path: Path, local_source: tuple[Path, dict]
) -> None:
    src, data = local_source
    data["sources"] = {64: data["sources"][28]}
    got = medmnist.download(data, tmp_path / "cache", size=64, progress=False)
    assert got == tmp_path / "cache" / "tiny_64.npz" and got.read_bytes() == src.read_bytes()


def test_download_of_an_unpublished_size_lists_the_published_ones(tmp_path: Path) -> None:
    data = medmnist.dataset_config("dermamnist")
    with pytest.raises(DataError, match=r"publishes dermamnist at 28, 64, 128, 224 px, not 32"):
        medmnist.download(data, tmp_path, size=32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_without_sources_says_what_to_do(tmp_path: Path) -> None:
    data = {"name": "mine", "image_size": 28, "sources": {}}
    with pytest.raises(DataError, match="data.sources is empty for 'mine'.*data.path="):
        medmnist.download(data, tmp_path, progress=False)


def test_download_checksum_mismatch_removes_file(
    tmp_path: Path, local_source: tuple[Path, dict]
) -> None:
    src, _ = local_source
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="MD5 .* expected 0{32}"):
        medmnist.download(tiny_data(src.as_uri(), "0" * 32), cache, progress=False)
    assert list(cache.iterdir()) == []


def test_download_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cache = tmp_path / "cache"
    data = medmnist.dataset_config("pneumoniamnist")
    with pytest.raises(DataError) as info:
        medmnist.download(data, cache, progress=False)
    message = str(info.value)
    assert "cannot download pneumoniamnist" in message and "name resolution" in message
    assert "no network?" in message and str(cache / "pneumoniamnist.npz") in message
    assert "data.path=/path/to/pneumoniamnist.npz" in message
    assert list(cache.iterdir()) == []  # no partial file left behind
    with pytest.raises(DataError, match="data.path=/path/to/pneumoniamnist_128.npz"):
        medmnist.download(data, cache, size=128, progress=False)


def test_download_unreachable_url_is_a_data_error(tmp_path: Path) -> None:
    missing = (tmp_path / "nowhere.npz").as_uri()
    with pytest.raises(DataError, match="no network"):
        medmnist.download(tiny_data(missing, "0" * 32), tmp_path / "cache", progress=False)


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path, capsys) -> None:
    with pytest.raises(DataError, match="unknown dataset 'nope'; known: bloodmnist, .*retina"):
        medmnist.dataset_config("nope")
    assert main(["data", "download", "nope", "--cache", str(tmp_path)]) == 2
    assert "unknown dataset 'nope'; known: bloodmnist, breastmnist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_unpublished_size_before_any_download(tmp_path: Path, capsys) -> None:
    assert main(["data", "download", "retinamnist", "--size", "32", "--cache", str(tmp_path)]) == 2
    assert "publishes retinamnist at 28, 64, 128, 224 px, not 32" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_downloads_a_dataset_by_name_and_size(
    tmp_path: Path, local_source: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    src, data = local_source
    official = medmnist.dataset_config("bloodmnist")
    official["sources"][64] = data["sources"][28]  # the official URL, served from a file
    monkeypatch.setattr(medmnist, "dataset_config", lambda name: official)
    assert main(["data", "download", "bloodmnist", "--size", "64", "--cache", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "bloodmnist_64.npz")
    assert (tmp_path / "bloodmnist_64.npz").read_bytes() == src.read_bytes()


def test_multi_label_labels_are_a_clear_data_error(tmp_path: Path) -> None:
    path = tmp_path / "chest.npz"
    labels = np.random.default_rng(0).integers(0, 2, (5, 14), dtype=np.uint8)  # ChestMNIST
    np.savez(path, train_images=np.zeros((5, 28, 28), np.uint8), train_labels=labels)
    with pytest.raises(DataError) as info:
        load_npz(path, "train")
    message = str(info.value)
    assert "train_labels has shape (5, 14): 14 labels per image" in message
    assert "single-label class-conditional generators" in message and str(path) in message


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDTWIN_CACHE", str(tmp_path / "env"))
    assert medmnist.cache_dir(str(tmp_path / "conf")) == tmp_path / "conf"
    assert medmnist.cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("FEDTWIN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert medmnist.cache_dir(None) == tmp_path / ".cache" / "fedtwin"


def test_resolve_data_path(tmp_path: Path, local_source: tuple[Path, dict]) -> None:
    src, data = local_source
    assert medmnist.resolve_data_path({**data, "path": str(src)}) == src
    with pytest.raises(DataError, match="absent.npz"):
        medmnist.resolve_data_path({**data, "path": str(tmp_path / "absent.npz")})
    cache = tmp_path / "cache"
    got = medmnist.resolve_data_path({**data, "cache_dir": str(cache)}, progress=False)
    assert got == cache / "tiny.npz" and got.is_file()


@pytest.mark.parametrize("image_size, expected", [(28, 28), (32, 64), (64, 64), (256, 224)])
def test_resolve_data_path_downloads_the_nearest_larger_size(
    tmp_path: Path, local_source: tuple[Path, dict], image_size: int, expected: int
) -> None:
    _, data = local_source
    entry = data["sources"][28]
    data = {**data, "image_size": image_size, "cache_dir": str(tmp_path / "cache")}
    data["sources"] = {size: entry for size in (28, 64, 128, 224)}
    got = medmnist.resolve_data_path(data, progress=False)
    assert got == tmp_path / "cache" / medmnist.file_name("tiny", expected)
