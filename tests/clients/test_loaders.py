"""Reading the data sets from files, embedded copies and the hub (clients.loaders)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image as PILImage
from datasets import Dataset, Features, Image, Value

from clients import loaders
from clients.examples import BagExamples


def test_mnist_files_are_the_full_set(data_dir):
    train, test = loaders.load_mnist_files(data_dir)
    assert train.x.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert np.bincount(test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1) < 0.01


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="header says"):
        loaders.read_idx(bad)
    with gzip.open(bad, "wb") as f:
        f.write(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        loaders.read_idx(bad)


def test_embedded_data_is_real_and_split_like_keras(data_dir):
    tr, te = loaders.load_housing_embedded()
    ftr, fte = loaders.load_housing_files(data_dir)
    assert (len(tr), len(te)) == (404, 102)
    np.testing.assert_allclose(tr.x, ftr.x, rtol=1e-6)
    np.testing.assert_allclose(te.y, fte.y, rtol=1e-6)
    mtr, mte = loaders.load_mnist_embedded(seed=0)
    assert (len(mtr), len(mte)) == (4000, 1000)
    assert np.bincount(mte.y).tolist() == [100] * 10


def test_housing_csv_gives_the_npz_split(data_dir, tmp_path):
    (tmp_path / "boston_house_prices.csv").write_bytes(
        (data_dir / "boston-housing" / "boston_house_prices.csv").read_bytes())
    tr, te = loaders.load_housing_files(tmp_path)
    ftr, _ = loaders.load_housing_files(data_dir)
    np.testing.assert_allclose(tr.x, ftr.x, rtol=1e-6)
    np.testing.assert_allclose(tr.y, ftr.y, rtol=1e-6)


def test_spam_files_with_mailboxes(data_dir):
    train, test, groups = loaders.load_spam_files(data_dir, 4096, seed=1)
    assert len(train) + len(test) == 16545 + 17170
    assert len(test) == (16545 + 17170) // 10
    assert sorted(set(groups)) == [f"enron{i}" for i in range(1, 7)]
    assert train.tokens.max() < 4096 and 0.4 < train.y.mean() < 0.6


def test_token_hasher_is_stable_and_uses_word_sets():
    h = loaders.TokenHasher(1000)
    assert h("a b a c").tolist() == sorted({h.bucket("a"), h.bucket("b"), h.bucket("c")})
    assert loaders.TokenHasher(1000).bucket("viagra") == h.bucket("viagra")


def test_missing_data_says_where_to_put_which_files(tmp_path):
    for task, load in [("mnist", loaders.load_mnist_files), ("housing", loaders.load_housing_files)]:
        with pytest.raises(loaders.DataNotFoundError, match="data-dir") as err:
            load(tmp_path)
        assert loaders.EXPECTED_FILES[task][0] in str(err.value)
    with pytest.raises(loaders.DataNotFoundError, match="ham.txt"):
        loaders.load_spam_files(tmp_path, 16, 0)


def test_hub_converters_on_hub_shaped_datasets():
    images = [PILImage.fromarray(np.full((28, 28), i * 20, np.uint8)) for i in range(3)]
    ds = Dataset.from_dict({"image": images, "label": [0, 1, 2]},
                           features=Features({"image": Image(), "label": Value("int64")}))
    ex = loaders.mnist_from_hf(ds)
    assert ex.x.shape == (3, 1, 28, 28) and ex.y.tolist() == [0, 1, 2]
    spam = Dataset.from_dict({"text": ["Buy NOW now", "meeting at noon"], "label": [1, 0]})
    bags = loaders.spam_from_hf(spam, 64)
    assert isinstance(bags, BagExamples) and bags.y.tolist() == [1.0, 0.0]
    assert len(bags.bag(0)) == len(loaders.TokenHasher(64)("buy now now"))
