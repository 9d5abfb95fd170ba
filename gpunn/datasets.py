"""Named MNIST-layout data sets (MNIST, Fashion-MNIST, Kuzushiji-MNIST), fetched with pooch.

* ``DATASETS``: the registry, name -> ``Dataset``: a title and class names for plots, mirrors, and the
  SHA-256 that each of the four ``.gz`` files (``FILES``) must have.
* ``cache_dir(name)``: ``$XDG_CACHE_HOME/gpunn/<name>`` (default ``~/.cache/gpunn/<name>``).
* ``fetch(name)``: the four files in the cache, each downloaded with pooch from the first mirror that
  serves a file passing its check; ``load(name)``: fetch, then (train, val) as ``gpunn.data.Split``.

How a file is checked, per data set:

* Fashion-MNIST and KMNIST: the SHA-256 of the ``.gz`` file as published (pooch's ``known_hash``).
* MNIST: the SHA-256 of the *decompressed* file (``Dataset.content_sha256``), because mirrors re-wrap
  the same bytes in different gzip streams (the shared CI copy does); a wrong ``.gz`` digest says
  nothing about the data, a wrong content digest says everything. The published ``.gz`` digests are
  kept in ``Dataset.sha256`` for reference and are not checked.

Either way the check runs on pooch's temporary file, before pooch moves it into place, so a refused
or interrupted download leaves nothing in the cache; a cached file is checked again before it is
trusted, and one that fails is downloaded again.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import re
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import data
from .errors import DataError

# The MNIST IDX layout shared by all three sets: 28x28 uint8 images, labels 0…9.
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _in_file_order(*digests: str) -> dict[str, str]:
    return dict(zip(FILES, digests, strict=True))


@dataclass(frozen=True)
class Dataset:
    """A named MNIST-layout data set: where its four files come from and how each is checked.

    ``sha256`` maps each file name (``FILES``) to the SHA-256 of the ``.gz`` file as published;
    ``content_sha256``, where given, maps it to the SHA-256 of the decompressed file, and then that
    is checked instead (any gzip wrapper of the right bytes is accepted). ``mirrors`` are base URLs
    ending in ``/``, tried in order.
    """

    name: str
    title: str
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]
    sha256: Mapping[str, str]
    content_sha256: Mapping[str, str] | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(self.sha256)


# .gz digests, all from TensorFlow Datasets' url_checksums, each agreeing with torchvision's prototype
# datasets (pytorch/vision torchvision/prototype/datasets/_builtin/mnist.py, _CHECKSUMS):
#   MNIST          https://github.com/tensorflow/datasets/blob/31f1255e57e519a6c004f0b097a2f5cfcf0dde7d/tensorflow_datasets/url_checksums/mnist.txt
#   Fashion-MNIST  https://github.com/tensorflow/datasets/blob/333639b37af6c6fedf3610a4a2d42f1c6ef6f7d5/tensorflow_datasets/url_checksums/fashion_mnist.txt
#   KMNIST         https://github.com/tensorflow/datasets/blob/333639b37af6c6fedf3610a4a2d42f1c6ef6f7d5/tensorflow_datasets/url_checksums/kmnist.txt
# MNIST content digests: ../shared/data/README.md, recomputed from the
# shared copy. Second mirrors: zalandoresearch/fashion-mnist keeps the published files under
# data/fashion (its label files hash to the digests below); for KMNIST no independent mirror serves
# the published files, so the second is the same server over HTTPS.
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            name="mnist",
            title="MNIST",
            classes=tuple("0123456789"),
            mirrors=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/",
            ),
            sha256=_in_file_order(
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
            content_sha256=_in_file_order(
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        ),
        Dataset(
            name="fashion-mnist",
            title="Fashion-MNIST",
            classes=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),
            mirrors=(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            ),
            sha256=_in_file_order(
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
        ),
        Dataset(
            name="kmnist",
            title="Kuzushiji-MNIST",
            # romanised, as torchvision has them: the hiragana お き す つ な は ま や れ を need a
            # Japanese font that plots cannot count on
            classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
            mirrors=(
                "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
                "https://codh.rois.ac.jp/kmnist/dataset/kmnist/",
            ),
            sha256=_in_file_order(
                "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
                "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
                "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
                "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
            ),
        ),
    )
}


def get(name: str | Dataset) -> Dataset:
    """The registered data set ``name`` (a ``Dataset`` passes through unchanged)."""
    if isinstance(name, Dataset):
        return name
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/gpunn/<name>``, or ``~/.cache/gpunn/<name>``; not created here."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative or empty value is to be ignored
        try:
            home = Path.home()
        except (RuntimeError, KeyError, OSError):
            home = None
        if home is None or not home.is_absolute():
            raise DataError(
                "no home directory to keep the data cache in; set XDG_CACHE_HOME to a writable folder, "
                f"or {_data_dir_hint()}"
            )
        base = home / ".cache"
    return Path(base) / "gpunn" / name


def fetch(
    name: str | Dataset,
    folder: str | Path | None = None,
    progress: bool = True,
    timeout: float = 30,
) -> Path:
    """The folder (default ``cache_dir(name)``) holding the data set's four checked ``.gz`` files.

    Each file that is missing, or present but failing its check, is downloaded with pooch from the
    first of ``mirrors`` that answers with a file passing the check (a tqdm bar on stderr when
    ``progress``); ``timeout`` (s) bounds each connection and each wait for data. A complete
    folder is only read, so it may be read-only.
    """
    dataset = get(name)
    folder = cache_dir(dataset.name) if folder is None else Path(folder).expanduser()
    missing = [f for f in dataset.files if not _passes(folder / f, dataset, f)]
    if not missing:
        return folder
    _make_writable_folder(folder)
    import pooch  # lazily: 0.15 s of imports that a run on a filled cache never needs

    with _quiet(pooch.get_logger()):
        for fname in missing:
            _download(pooch, dataset, fname, folder, progress, timeout)
    return folder


def load(name: str | Dataset, folder: str | Path | None = None, progress: bool = True):
    """(train, val) ``gpunn.data.Split`` of the data set ``name``, fetched first (see ``fetch``)."""
    dataset = get(name)
    return data.load_idx_dataset(fetch(dataset, folder, progress), num_classes=len(dataset.classes))


# --- checks --------------------------------------------------------------------------------------


class _Mismatch(ValueError):
    """A file fails its check (a ValueError, which pooch lets through after deleting its temporary)."""


def _sha256(stream) -> str:
    """SHA-256 of everything ``stream`` (a binary file) yields, read a MiB at a time."""
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _content_sha256(path: str | Path) -> str:
    """SHA-256 of the decompressed content of the gzip file ``path``; _Mismatch if it is no gzip."""
    try:
        with gzip.open(path, "rb") as f:
            return _sha256(f)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _Mismatch(f"checksum mismatch: not a complete gzip file ({exc})") from None


def _check_content(path: str | Path, expected: str) -> None:
    got = _content_sha256(path)
    if got != expected:
        raise _Mismatch(f"checksum mismatch (content sha256 {got[:12]}…, expected {expected[:12]}…)")


def _passes(path: Path, dataset: Dataset, fname: str) -> bool:
    """Whether ``path`` exists and passes the check of ``fname`` in ``dataset``."""
    if not path.is_file():
        return False
    try:
        if dataset.content_sha256:
            _check_content(path, dataset.content_sha256[fname])
            return True
        with open(path, "rb") as f:
            return _sha256(f) == dataset.sha256[fname]
    except _Mismatch:
        return False
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


class _CheckedDownloader:
    """A pooch downloader that refuses a file whose decompressed content has the wrong SHA-256.

    pooch calls it with its temporary file, and deletes that file when the call raises, so a
    refused file never reaches the cache.
    """

    def __init__(self, downloader, content_sha256: str):
        self.downloader, self.content_sha256 = downloader, content_sha256

    def __call__(self, url, output_file, pooch_instance):
        self.downloader(url, output_file, pooch_instance)
        _check_content(output_file, self.content_sha256)


# --- the download --------------------------------------------------------------------------------


def _download(pooch, dataset: Dataset, fname: str, folder: Path, progress: bool, timeout: float):
    """Download ``fname`` into ``folder`` from the first mirror whose file passes the check."""
    import requests

    target = folder / fname
    try:
        target.unlink(missing_ok=True)  # it failed its check, and pooch would keep it without known_hash
    except OSError as exc:
        raise DataError(f"cannot replace {target}, which fails its check: {exc.strerror or exc}") from None
    failures, offline = [], False
    for mirror in dataset.mirrors:
        url = mirror + fname
        with _progress_bar(fname, progress) as bar:
            # chunk_size: pooch's 1 KiB default makes 26 000 bar updates for one file
            http = pooch.HTTPDownloader(
                progressbar=False if bar is None else bar, timeout=timeout, chunk_size=1 << 16
            )
            if dataset.content_sha256:
                downloader, known_hash = _CheckedDownloader(http, dataset.content_sha256[fname]), None
            else:
                downloader, known_hash = http, "sha256:" + dataset.sha256[fname]
            try:
                # retrieve never retries a URL (pooch.create's retry_if_failed would, after 1 s, 2 s, …);
                # the next mirror is the retry
                pooch.retrieve(url, known_hash, fname=fname, path=folder, downloader=downloader)
                return
            except requests.exceptions.RequestException as exc:  # before OSError, its base class
                failures.append(f"{url}: {_network_reason(exc, timeout)}")
                offline = True
            except _Mismatch as exc:
                failures.append(f"{url}: {exc}")
            except ValueError:  # pooch's known_hash check, which says so in a paragraph
                failures.append(f"{url}: checksum mismatch (expected sha256 {dataset.sha256[fname][:12]}…)")
            except OSError as exc:
                raise DataError(f"cannot write {target}: {exc.strerror or exc}") from None
    hint = f"without internet access, {_data_dir_hint()}" if offline else "nothing was kept"
    raise DataError(f"could not download {fname} of {dataset.title} ({'; '.join(failures)}); {hint}")


def _network_reason(exc, timeout: float) -> str:
    """A few words for a requests failure (its own message is a paragraph of nested reprs)."""
    import requests

    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}".rstrip()
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    if errno_text:
        return errno_text.group(1).strip().lower()
    return type(exc).__name__


def _data_dir_hint() -> str:
    return f"pass --data-dir DIR or set {data.ENV_DATA_DIR} to a folder holding the four files"


def _make_writable_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        reason = None if os.access(folder, os.W_OK) else "not writable"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    if reason:
        raise DataError(
            f"cannot download into {folder}: {reason}; set XDG_CACHE_HOME to a writable folder, "
            f"or {_data_dir_hint()}"
        )


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """pooch's logger (its own, with a stderr handler and no level) prints a line per file at INFO,
    and a SHA-256 hint for each file fetched without ``known_hash``: the tqdm bar is enough."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _progress_bar(fname: str, enabled: bool):
    """A tqdm bar on stderr, cleared when done, or None; pooch sets its total and fills it."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    # total=1 until pooch sets it: pooch tests the bar's truth first, and an empty tqdm has none
    bar = tqdm(total=1, desc=f"downloading {fname}", unit="B", unit_scale=True, file=sys.stderr, leave=False)
    try:
        yield bar
    finally:
        bar.close()  # pooch closes it only after a complete download
