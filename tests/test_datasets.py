"""Named datasets: the registry, the cache folder, and pooch downloads from a local HTTP mirror."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import re
import threading
from pathlib import Path

import numpy as np
import pytest

import gpunn
from gpunn import datasets
from gpunn.data import load_idx_dataset
from gpunn.datasets import FILES, Dataset, fetch

from helpers import idx_bytes, make_digits

DEAD = "http://127.0.0.1:9/"  # nothing listens on the discard port: refused at once


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(root, url): a local HTTP server publishing the folder root at url."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy set for the real internet must not intercept
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _QuietHandler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def payloads(seed: int = 0) -> dict[str, bytes]:
    """The decompressed bytes of the four files of a small 28x28 dataset."""
    (Xtr, ytr), (Xva, yva) = make_digits(30, seed), make_digits(10, seed + 1)
    return {name: idx_bytes(array) for name, array in zip(FILES, (Xtr, ytr, Xva, yva))}


def publish(server, subdir: str, seed: int = 0, mtime: int = 0) -> tuple[str, dict[str, bytes]]:
    """Serve the four .gz files of ``payloads(seed)`` under ``subdir``; (their base URL, the .gz bytes)."""
    root, url = server
    (root / subdir).mkdir()
    gz = {name: gzip.compress(raw, mtime=mtime) for name, raw in payloads(seed).items()}
    for name, blob in gz.items():
        (root / subdir / name).write_bytes(blob)
    return f"{url}{subdir}/", gz


def toy(mirrors, gz: dict[str, bytes], by_content: bool = False) -> Dataset:
    """A dataset whose published files are ``gz``: checked by the .gz digest, or by the content's."""
    sha = {name: hashlib.sha256(blob).hexdigest() for name, blob in gz.items()}
    content = {name: hashlib.sha256(gzip.decompress(blob)).hexdigest() for name, blob in gz.items()}
    return Dataset("toy", "Toy", tuple("0123456789"), tuple(mirrors), sha, content if by_content else None)


@pytest.mark.parametrize("by_content", [False, True])
def test_falls_back_from_a_dead_and_a_forged_mirror(tmp_path, server, by_content):
    good, gz = publish(server, "good")
    forged, _ = publish(server, "forged", seed=5)  # well-formed files, other data
    cache = tmp_path / "cache"
    assert fetch(toy([DEAD, forged, good], gz, by_content), cache, progress=False) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILES)  # no temporary files left
    assert all((cache / name).read_bytes() == blob for name, blob in gz.items())
    train, val = load_idx_dataset(cache)
    np.testing.assert_array_equal(train.X.reshape(30, 28, 28), make_digits(30, 0)[0])
    assert val.y.shape == (10,)


def test_content_check_accepts_another_gzip_wrapper_of_the_same_bytes(tmp_path, server):
    url, published = publish(server, "mirror", mtime=1)  # served: the same content, another gzip header
    original = {name: gzip.compress(gzip.decompress(blob), mtime=2) for name, blob in published.items()}
    assert all(original[n] != published[n] for n in FILES)
    fetch(toy([url], original, by_content=True), tmp_path / "c", progress=False)
    with pytest.raises(gpunn.DataError, match="checksum mismatch"):  # the .gz digest alone refuses them
        fetch(toy([url], original), tmp_path / "d", progress=False)


@pytest.mark.parametrize("by_content", [False, True])
def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, server, by_content):
    url, gz = publish(server, "m")
    wrong = dict(gz, **{FILES[0]: gzip.compress(b"other bytes")})
    cache = tmp_path / "cache"
    with pytest.raises(gpunn.DataError) as info:
        fetch(toy([url], wrong, by_content), cache, progress=False)
    message = str(info.value)
    assert f"{url}{FILES[0]}: checksum mismatch" in message and "nothing was kept" in message
    assert "\n" not in message and "--data-dir" not in message  # not an offline problem
    assert list(cache.iterdir()) == []


def test_a_file_that_is_not_gzip_is_refused_by_the_content_check(tmp_path, server):
    url, gz = publish(server, "m")
    (server[0] / "m" / FILES[1]).write_bytes(b"<html>moved</html>")  # what a captive portal serves
    with pytest.raises(gpunn.DataError, match="not a complete gzip file"):
        fetch(toy([url], gz, by_content=True), tmp_path / "cache", progress=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [FILES[0]]  # checked, kept


def test_offline_message_names_every_url_tried_and_the_way_out(tmp_path, server):
    missing_url = server[1] + "nothing/"
    dataset = toy([DEAD, missing_url], publish(server, "m")[1])
    with pytest.raises(gpunn.DataError) as info:
        fetch(dataset, tmp_path / "cache", progress=False, timeout=2)
    message = str(info.value)
    assert f"{DEAD}{FILES[0]}: connection refused" in message
    assert f"{missing_url}{FILES[0]}: HTTP 404" in message
    assert "without internet access, pass --data-dir DIR or set GPUNN_DATA_DIR" in message
    assert "\n" not in message


def test_a_complete_cache_is_only_read(tmp_path, server):
    url, gz = publish(server, "m")
    cache = tmp_path / "cache"
    fetch(toy([url], gz), cache, progress=False)
    for path in cache.iterdir():
        path.chmod(0o444)
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    for by_content in (False, True):  # dead mirrors: any download attempt would fail
        assert fetch(toy([DEAD], gz, by_content), cache, progress=False) == cache
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps


def test_a_damaged_cached_file_is_downloaded_again(tmp_path, server):
    url, gz = publish(server, "m")
    cache = tmp_path / "cache"
    fetch(toy([url], gz), cache, progress=False)
    (cache / FILES[2]).write_bytes(gz[FILES[2]][:100])  # truncated, e.g. by a full disk
    fetch(toy([url], gz, by_content=True), cache, progress=False)
    assert (cache / FILES[2]).read_bytes() == gz[FILES[2]]


def test_the_user_sees_a_bar_and_no_pooch_log(tmp_path, server, capfd):
    import pooch  # here, as gpunn.datasets imports it: only where a download is made

    level = pooch.get_logger().level
    url, gz = publish(server, "m")
    fetch(toy([url], gz, by_content=True), tmp_path / "cache", progress=True)  # no known_hash: most chatty
    out, err = capfd.readouterr()
    assert out == "" and "downloading train-images-idx3-ubyte.gz" in err
    assert not re.search(r"Downloading data|SHA256 hash|known_hash", err)
    assert pooch.get_logger().level == level  # put back: other users of pooch keep their settings


def test_load_fetches_then_reads(tmp_path, server, monkeypatch):
    url, gz = publish(server, "m")
    monkeypatch.setitem(datasets.DATASETS, "mnist", toy([url], gz, by_content=True))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    train, val = datasets.load("mnist", progress=False)
    assert train.X.shape == (30, 784) and val.X.shape == (10, 784)
    assert sorted(p.name for p in (tmp_path / "xdg" / "gpunn" / "toy").iterdir()) == sorted(FILES)


def test_unknown_name_is_refused_with_the_known_ones(tmp_path):
    known = r"; known: fashion-mnist, kmnist, mnist$"
    with pytest.raises(gpunn.DataError, match=r"unknown dataset 'cifar10'" + known):
        fetch("cifar10", tmp_path)
    with pytest.raises(gpunn.DataError, match=r"unknown dataset 'MNIST '" + known):
        datasets.load("MNIST ")


def test_registry_has_the_three_sets_with_mirrors_and_digests():
    assert set(datasets.DATASETS) == {"mnist", "fashion-mnist", "kmnist"}
    titles = {d.title for d in datasets.DATASETS.values()}
    assert titles == {"MNIST", "Fashion-MNIST", "Kuzushiji-MNIST"}
    sha256 = re.compile(r"[0-9a-f]{64}")
    for name, d in datasets.DATASETS.items():
        assert d.name == name and len(d.classes) == len(set(d.classes)) == 10
        assert d.files == FILES and len(d.mirrors) >= 2
        assert all(re.fullmatch(r"https?://[^/\s]+/(\S*/)?", url) for url in d.mirrors)
        assert all(sha256.fullmatch(d.sha256[f]) for f in FILES)
        assert d.content_sha256 is None or all(sha256.fullmatch(d.content_sha256[f]) for f in FILES)
    assert set(datasets.DATASETS["mnist"].content_sha256) == set(FILES)  # mirrors re-wrap MNIST


def test_cache_dir_follows_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.cache_dir("kmnist") == tmp_path / "xdg" / "gpunn" / "kmnist"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for ignored in ("", "relative/cache"):  # the XDG spec: ignore a relative value
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert datasets.cache_dir("mnist") == tmp_path / "home" / ".cache" / "gpunn" / "mnist"


def test_no_home_directory_is_a_clear_error(monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(gpunn.DataError, match=r"no home directory .* XDG_CACHE_HOME .* --data-dir DIR"):
        fetch("mnist", progress=False)


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # root may write anywhere, but not below a file
    with pytest.raises(gpunn.DataError) as info:
        fetch(dataclasses.replace(datasets.DATASETS["fashion-mnist"], mirrors=(DEAD,)), progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot download into {blocker}/gpunn/fashion-mnist: ")
    assert "XDG_CACHE_HOME" in message and "--data-dir DIR" in message and "\n" not in message


@pytest.mark.mnist
def test_shared_mnist_passes_the_content_check(mnist_dir):
    """The shared copy's .gz wrappers are not the published ones; its content is, and that is checked."""
    if not all((mnist_dir / name).is_file() for name in FILES):
        pytest.skip(f"GPUNN_DATA_DIR={mnist_dir} holds MNIST, but not as the four .gz files")
    offline = dataclasses.replace(datasets.DATASETS["mnist"], mirrors=(DEAD,))
    assert fetch(offline, mnist_dir, progress=False) == mnist_dir  # nothing to download, nothing written
