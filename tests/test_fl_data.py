"""Data: loaders, the Dirichlet split, augmentation, configs."""

import pickle

import numpy as np
import pytest
import torch

from fl.config import load_config
from fl.data import augment_batch, dirichlet_split, fit_images, load_cifar, load_dataset, make_clients, make_datasets


def _write_fake_cifar(root, n=6):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(root / name, "wb") as f:
            pickle.dump(d, f)


def test_cifar_pickle_loader(tmp_path):
    _write_fake_cifar(tmp_path)
    xtr, ytr, xte, yte = load_cifar(tmp_path, 10)
    assert xtr.shape == (30, 3, 32, 32) and xte.shape == (6, 3, 32, 32) and ytr.dtype == np.int64
    train, test = load_dataset({"dataset": "cifar10", "root": str(tmp_path)})
    assert train.x.shape == (30, 3, 32, 32) and train.num_classes == 10
    torch.testing.assert_close(train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_cifar_missing_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*data_batch_1"):
        load_cifar(tmp_path / "nowhere", 10)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset({"dataset": "cifar100", "root": str(tmp_path)})


def test_npz_and_user_arrays(tmp_path):
    rng = np.random.default_rng(1)
    arrays = dict(
        x_train=rng.random((20, 12, 12, 3)),
        y_train=rng.integers(0, 3, 20),
        x_test=rng.random((5, 12, 12, 3)),
        y_test=rng.integers(0, 3, 5),
    )
    np.savez(tmp_path / "d.npz", **arrays)
    train, test = load_dataset({"dataset": "npz", "path": str(tmp_path / "d.npz"), "image_size": 16})
    assert train.x.shape == (20, 3, 16, 16) and test.x.shape == (5, 3, 16, 16)
    with pytest.raises(FileNotFoundError):
        load_dataset({"dataset": "npz", "path": str(tmp_path / "missing.npz")})
    with pytest.raises(ValueError, match="NHW"):
        make_datasets(np.zeros((2, 3)), [0, 1], np.zeros((1, 3)), [0])


def test_offline_real_data():
    train, test = load_dataset({"dataset": "mnist5k", "image_size": 32})
    assert len(train) + len(test) == 5000 and train.x.shape[1:] == (1, 32, 32)
    train, test = load_dataset({"dataset": "digits", "image_size": 16})
    assert len(train) + len(test) == 1797 and train.x.shape[1:] == (1, 16, 16) and train.num_classes == 10


def test_fit_images_pads_or_resizes():
    x = torch.ones(1, 1, 28, 28)
    padded = fit_images(x, 32)
    assert padded.shape[-2:] == (32, 32) and padded[..., :2, :].abs().sum() == 0 and padded.sum() == 28 * 28
    assert fit_images(torch.ones(1, 1, 8, 8), 32).shape[-2:] == (32, 32)


def test_dirichlet_split_partitions_and_repeats():
    labels = np.repeat(np.arange(5), 40)
    parts = dirichlet_split(labels, 7, alpha=0.5, seed=3)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(200)) and min(map(len, parts)) >= 2
    again = dirichlet_split(labels, 7, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    skewed = dirichlet_split(labels, 5, alpha=0.05, seed=0)
    iid = dirichlet_split(labels, 5, alpha=1000.0, seed=0)
    n_classes = lambda ps: np.mean([len(np.unique(labels[p])) for p in ps])
    assert n_classes(skewed) < n_classes(iid)
    with pytest.raises(ValueError):
        dirichlet_split(labels, 500, alpha=0.5)


def test_make_clients_holdout():
    train, _ = load_dataset({"dataset": "synthetic", "num_samples": 200})
    clients = make_clients(train, 4, 1.0, seed=0, holdout=0.25)
    for c in clients:
        assert len(set(c.train_idx.tolist()) & set(c.test_idx.tolist())) == 0
        assert len(c.test_idx) == int((len(c.train_idx) + len(c.test_idx)) * 0.25)


def test_augment_crop_flip():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, "crop", g)
    assert out.shape == x.shape
    # every crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        assert any(torch.equal(out[i, 0], padded[i, 0, a : a + 6, b : b + 6]) for a in range(9) for b in range(9))
    flips = augment_batch(x.repeat(64, 1, 1, 1), "crop_flip", torch.Generator().manual_seed(1))
    assert flips.shape == (128, 1, 6, 6)
    assert torch.equal(augment_batch(x, "none", g), x)
    with pytest.raises(ValueError, match="augment"):
        augment_batch(x, "rotate", g)


def test_config_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\n[train]\nlr = 0.1\n')
    cfg = load_config(p, ["train.lr=0.5", "method.name=flasc", "faults.raise_clients=[1, 2]", "method.bits=4"])
    assert cfg["train"]["lr"] == 0.5 and cfg["method"]["name"] == "flasc"
    assert cfg["faults"]["raise_clients"] == [1, 2] and cfg["method"]["bits"] == 4
    assert cfg["train"]["batch_size"] == 32  # default kept
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(p, ["nonsense"])
