"""Tests for pcdeq.training.data: each dataset is read from small files written in its real on-disk format."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import lightning as L
import numpy as np
import pytest
import scipy.io
import torch

from pcdeq.dataset_specs import DATASET_SPECS, get_spec
from pcdeq.errors import DataError, DataNotFoundError
from pcdeq.training.data import _SOURCES, EquilibriumDataModule, _Source, dataset_summary

# ---------------------------------------------------------------- writers of the real file formats


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """IDX ubyte file: big-endian magic, one big-endian uint32 per dimension, then the raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist_images(n: int, offset: int) -> np.ndarray:
    # every pixel distinct within an image and shifted per image, so a wrong index or layout shows up
    pixels = np.arange(n * 28 * 28).reshape(n, 28, 28) + offset
    return (pixels * 7 % 256).astype(np.uint8)


def write_mnist(root: Path, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    raw = root / "MNIST" / "raw"
    arrays = {
        "train-images-idx3-ubyte": _mnist_images(n_train, 0),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": _mnist_images(n_test, 5),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 3) % 10,
    }
    for name, array in arrays.items():
        _write_idx(raw / name, 2051 if "images" in name else 2049, array)
    return arrays


def _cifar_rows(n: int, start: int) -> np.ndarray:
    """Rows of 3072 bytes in CHW order: red varies over the image, green is 100, blue encodes the index."""
    red = np.tile((np.arange(1024) * 3 % 256), (n, 1))
    green = np.full((n, 1024), 100)
    blue = np.repeat((200 + start + np.arange(n))[:, None] % 256, 1024, axis=1)
    return np.concatenate([red, green, blue], axis=1).astype(np.uint8)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    # The real batches are Python 2 pickles: their str keys load as b"data" under encoding="bytes" but as
    # "data" under encoding="latin1", which torchvision uses; Python 3 str keys load the same way there.
    batches = {f"data_batch_{i}": (per_batch, (i - 1) * per_batch) for i in range(1, 6)}
    batches["test_batch"] = (n_test, 50)
    for name, (n, start) in batches.items():
        entry = {
            "batch_label": name,
            "data": _cifar_rows(n, start),
            "labels": [(start + k) % 10 for k in range(n)],
            "filenames": [f"img_{start + k}.png" for k in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer"]
        + ["dog", "frog", "horse", "ship", "truck"]
    }
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)


def _svhn_mat(path: Path, labels: list[int]) -> np.ndarray:
    n = len(labels)
    # MATLAB layout [H, W, C, N]; each channel/image gets its own pattern
    x = (np.arange(32 * 32 * 3 * n).reshape(32, 32, 3, n) * 5 % 256).astype(np.uint8)
    scipy.io.savemat(path, {"X": x, "y": np.array(labels, dtype=np.uint8).reshape(n, 1)})
    return x


def write_svhn(root: Path) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    return {
        # label 10 is SVHN's code for the digit 0
        "train": _svhn_mat(root / "train_32x32.mat", [10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1]),
        "test": _svhn_mat(root / "test_32x32.mat", [3, 10, 5, 10, 7]),
        # present on disk but never used: training uses the "train" split only
        "extra": _svhn_mat(root / "extra_32x32.mat", [1] * 7),
    }


def make_dm(name: str, root: Path | None = None, **kwargs) -> EquilibriumDataModule:
    dm = EquilibriumDataModule(name, data_dir=str(root) if root else "data", download=False, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


# ---------------------------------------------------------------- MNIST


def test_mnist_reads_idx_files(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path)
    dm = make_dm("mnist", tmp_path, normalize=False)
    assert (len(dm.train_set), len(dm.test_set)) == (20, 10)
    x, y = dm.train_set[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y == 3
    assert x[0, 5, 17].item() == pytest.approx(arrays["train-images-idx3-ubyte"][3, 5, 17] / 255)
    xt, yt = dm.test_set[9]
    assert yt == 2 and xt[0, 27, 0].item() == pytest.approx(arrays["t10k-images-idx3-ubyte"][9, 27, 0] / 255)
    assert [int(dm.train_set[i][1]) for i in range(20)] == list(np.arange(20) % 10)


def test_mnist_normalised(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path)
    x, _ = make_dm("mnist", tmp_path).train_set[0]
    expected = (arrays["train-images-idx3-ubyte"][0, 1, 2] / 255 - 0.1307) / 0.3081
    assert x[0, 1, 2].item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_reads_pickled_batches(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    dm = make_dm("cifar10", tmp_path, normalize=False)
    assert (len(dm.train_set), len(dm.test_set)) == (20, 6)
    x, y = dm.train_set[6]  # second batch, second image
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == 6
    red = np.arange(1024) * 3 % 256
    # CHW row-major: pixel (row 2, col 5) is byte 2 * 32 + 5 of each channel's 1024-byte plane
    assert x[0, 2, 5].item() == pytest.approx(red[2 * 32 + 5] / 255)
    assert x[1, 2, 5].item() == pytest.approx(100 / 255)
    assert x[2, 2, 5].item() == pytest.approx((200 + 6) / 255)
    xt, yt = dm.test_set[1]
    assert yt == 51 % 10 and xt[2, 0, 0].item() == pytest.approx((200 + 51) / 255)


def test_cifar10_normalisation(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    x, _ = make_dm("cifar10", tmp_path, normalize=True).train_set[0]
    spec = get_spec("cifar10")
    raw = (np.arange(1024)[31 * 32 + 7] * 3 % 256 / 255, 100 / 255, 200 / 255)
    for c in range(3):
        assert x[c, 31, 7].item() == pytest.approx((raw[c] - spec.mean[c]) / spec.std[c], abs=1e-5)


def test_cifar10_aug_augments_train_only(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    torch.manual_seed(0)
    dm = make_dm("cifar10_aug", tmp_path, normalize=False)
    names = [type(t).__name__ for t in dm.train_set.transform.transforms]
    assert "RandomCrop" in names and "RandomHorizontalFlip" in names
    assert dm.test_set.transform is None  # the test split: plain pixels, no per-image randomness
    assert any(not torch.equal(dm.train_set[i][0], dm.train_set[i][0]) for i in range(len(dm.train_set)))
    assert all(torch.equal(dm.test_set[i][0], dm.test_set[i][0]) for i in range(len(dm.test_set)))
    plain = make_dm("cifar10", tmp_path, normalize=False)
    assert torch.equal(dm.test_set[2][0], plain.test_set[2][0])


def test_cifar10_aug_validation_is_not_augmented(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    dm = make_dm("cifar10_aug", tmp_path, normalize=False, val_size=5)
    plain = make_dm("cifar10", tmp_path, normalize=False)
    for i, index in enumerate(dm.val_set.indices):
        assert torch.equal(dm.val_set[i][0], plain.train_set[index][0])


# ---------------------------------------------------------------- SVHN


def test_svhn_reads_mat_files(tmp_path: Path) -> None:
    arrays = write_svhn(tmp_path)
    dm = make_dm("svhn", tmp_path, normalize=False)
    assert (len(dm.train_set), len(dm.test_set)) == (12, 5)  # the 7 "extra" images are not used
    labels = [dm.train_set[i][1] for i in range(12)]
    assert labels == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # 10 -> 0
    assert [dm.test_set[i][1] for i in range(5)] == [3, 0, 5, 0, 7]
    x, _ = dm.train_set[4]
    assert x.shape == (3, 32, 32)
    for c in range(3):
        assert x[c, 9, 21].item() == pytest.approx(arrays["train"][9, 21, c, 4] / 255)


# ---------------------------------------------------------------- digits


def test_digits_split() -> None:
    dm = make_dm("digits", normalize=False)
    assert (len(dm.train_set), len(dm.test_set)) == (1437, 360)
    x, _ = dm.train_set[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    images = dm.train_set.images
    assert images.min() >= 0.0 and images.max() <= 1.0
    # stratified: each class's share of the test set matches its share of all 1797 images
    all_counts = np.bincount(np.concatenate([dm.train_set.labels.numpy(), dm.test_set.labels.numpy()]))
    test_counts = np.bincount(dm.test_set.labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 360 * all_counts / 1797) <= 1)
    again = make_dm("digits", normalize=False)
    assert torch.equal(dm.train_set.images, again.train_set.images)
    assert torch.equal(dm.test_set.labels, again.test_set.labels)


def test_digits_spec_matches_training_split() -> None:
    dm = make_dm("digits")
    x = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert x.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", sorted(DATASET_SPECS))
def test_synthetic_matches_spec(tmp_path: Path, name: str) -> None:
    # tmp_path is empty: synthetic data must not look for files
    dm = make_dm(name, tmp_path, synthetic=True, synthetic_size=(16, 8))
    spec = get_spec(name)
    assert (len(dm.train_set), len(dm.test_set)) == (16, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, *spec.shape) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < spec.num_classes


def test_synthetic_deterministic_by_seed() -> None:
    def images(seed: int) -> torch.Tensor:
        return make_dm("mnist", synthetic=True, synthetic_size=(8, 4), seed=seed).train_set.images

    assert torch.equal(images(1), images(1))
    assert not torch.equal(images(1), images(2))


# ---------------------------------------------------------------- validation split and loaders


def test_val_split() -> None:
    dm = make_dm("digits", val_size=100, seed=3)
    train, val = dm.train_set, dm.val_set
    assert (len(train), len(val), len(dm.test_set)) == (1337, 100, 360)
    assert not set(train.indices) & set(val.indices)
    assert set(train.indices) | set(val.indices) == set(range(1437))
    assert make_dm("digits", val_size=100, seed=3).val_set.indices == val.indices
    assert make_dm("digits", val_size=100, seed=4).val_set.indices != val.indices
    assert len(dm.val_dataloader()) == 2  # batches of 64, the last one partial


def test_val_size_too_large() -> None:
    with pytest.raises(ValueError, match="val_size"):
        make_dm("digits", val_size=1437)


def test_loaders() -> None:
    dm = make_dm("digits", batch_size=100, eval_batch_size=50)
    assert dm.val_dataloader() == []
    train = dm.train_dataloader()
    assert len(train) == 15  # drop_last=False keeps the partial batch of 37
    first = next(iter(train))[1]
    assert torch.equal(first, next(iter(make_dm("digits", batch_size=100).train_dataloader()))[1])
    assert not torch.equal(first, dm.train_set.labels[:100])  # shuffled
    _, y = next(iter(dm.test_dataloader()))
    assert torch.equal(y, dm.test_set.labels[:50])  # not shuffled


def test_lightning_fit_without_validation() -> None:
    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            raise AssertionError("val_size=0 must not run validation")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = EquilibriumDataModule("digits", batch_size=256)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.global_step == 6
    assert "digits: train 1437" in dataset_summary(dm)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "expected"),
    [("mnist", "train-images-idx3-ubyte"), ("svhn", "train_32x32.mat"), ("cifar10", "data_batch_1")],
)
def test_missing_data(tmp_path: Path, name: str, expected: str) -> None:
    dm = EquilibriumDataModule(name, data_dir=str(tmp_path), download=False)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DataNotFoundError) as info:
            step()
        message = str(info.value)
        assert str(tmp_path) in message and expected in message
        assert "dataset.synthetic=true" in message and "PCDEQ_DATA_DIR" in message
    assert issubclass(DataNotFoundError, FileNotFoundError)


def test_failed_download_is_reported(tmp_path: Path) -> None:
    dm = EquilibriumDataModule("mnist", data_dir=str(tmp_path), download=True)

    def offline(*args) -> None:
        raise URLError("no network")

    dm._source = _Source(offline, dm._source.files)
    with pytest.raises(DataNotFoundError, match="download failed: URLError") as info:
        dm.prepare_data()
    assert info.value.__suppress_context__ and info.value.__cause__ is None


def test_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        EquilibriumDataModule("imagenet")
    for name in DATASET_SPECS:
        assert name in str(info.value)


def test_epoch_shuffle_depends_only_on_seed_and_epoch() -> None:
    from pcdeq.training.data import EpochShuffleSampler

    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert sorted(first) == list(range(50)) and first != second  # a permutation, new each epoch
    b.set_epoch(1)
    assert list(b) == second  # a fresh sampler (a resumed run) at epoch 1 gives epoch 1's order
    assert list(EpochShuffleSampler(50, seed=4)) != first


# ---------------------------------------------------------------- damaged files: one message, file and fix


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _damaged(tmp_path: Path, name: str, file: str, problem: str) -> DataError:
    dm = EquilibriumDataModule(name, data_dir=str(tmp_path), download=False)
    dm.prepare_data()  # the files are all there: nothing to download
    with pytest.raises(DataError) as info:
        dm.setup()
    message = str(info.value)
    assert not isinstance(info.value, DataNotFoundError)
    assert str(tmp_path / file) in message and problem in message, message
    assert "delete it and download it again" in message and "Expected layout" in message
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)  # no chained traceback
    return err


@pytest.mark.parametrize(("file", "damage", "problem"), [
    # the case: torchvision said "shape '[60000, 28, 28]' is invalid for input of size 999984"
    ("MNIST/raw/train-images-idx3-ubyte", lambda p: _truncate(p), "truncated: "),
    ("MNIST/raw/t10k-labels-idx1-ubyte", lambda p: _truncate(p, 11), "truncated: 11 bytes, its header announces"),
    ("MNIST/raw/train-labels-idx1-ubyte", lambda p: p.write_bytes(b""), "it is empty (0 bytes)"),
    ("MNIST/raw/t10k-images-idx3-ubyte", lambda p: p.write_bytes(b"<html>not found</html>" * 50),
     "not an IDX file of 3-d unsigned bytes"),
    ("MNIST/raw/train-images-idx3-ubyte", lambda p: p.write_bytes(p.read_bytes() + b"\0" * 10),
     "longer than its header says"),
    ("MNIST/raw/train-labels-idx1-ubyte", lambda p: _write_idx(p, 2049, np.arange(19) % 10),
     "19 labels for 20 images"),
    ("MNIST/raw/t10k-images-idx3-ubyte", lambda p: _write_idx(p, 2051, np.zeros((10, 27, 28))),
     "items of shape (27, 28), expected (28, 28)"),
])
def test_damaged_mnist(tmp_path: Path, file: str, damage, problem: str) -> None:
    write_mnist(tmp_path)
    damage(tmp_path / file)
    _damaged(tmp_path, "mnist", file, problem)


@pytest.mark.parametrize(("file", "damage", "problem"), [
    ("cifar-10-batches-py/data_batch_3", lambda p: _truncate(p),
     "it cannot be unpickled (UnpicklingError: pickle data was truncated)"),
    ("cifar-10-batches-py/test_batch", lambda p: p.write_bytes(b""), "it is empty (0 bytes)"),
    ("cifar-10-batches-py/batches.meta", lambda p: p.write_bytes(b"garbage, not a pickle"), "cannot be unpickled"),
    ("cifar-10-batches-py/data_batch_5",
     lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]})),
     "data of shape (4, 100) for 4 labels, expected (4, 3072)"),
])
def test_damaged_cifar10(tmp_path: Path, file: str, damage, problem: str) -> None:
    write_cifar10(tmp_path)
    damage(tmp_path / file)
    _damaged(tmp_path, "cifar10", file, problem)


@pytest.mark.parametrize(("file", "damage", "problem"), [
    ("train_32x32.mat", lambda p: _truncate(p), "scipy.io.loadmat cannot read it"),
    ("test_32x32.mat", lambda p: p.write_bytes(b""), "it is empty (0 bytes)"),
    ("train_32x32.mat", lambda p: p.write_bytes(b"\x89PNG not a mat file" * 20), "scipy.io.loadmat cannot read it"),
    ("test_32x32.mat", lambda p: scipy.io.savemat(p, {"y": np.ones((3, 1))}), "no 'X' or no 'y' variable"),
])
def test_damaged_svhn(tmp_path: Path, file: str, damage, problem: str) -> None:
    write_svhn(tmp_path)
    damage(tmp_path / file)
    _damaged(tmp_path, "svhn", file, problem)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "svhn"])
def test_data_dir_that_is_a_file(tmp_path: Path, name: str) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("not a directory")
    for download in (False, True):
        dm = EquilibriumDataModule(name, data_dir=str(data_dir), download=download)
        with pytest.raises(DataError, match=rf"the data directory {data_dir} is a file, not a directory; fix: "
                                            r"point paths.data_dir=\.\.\."):
            dm.prepare_data()


def test_downloads_are_checksummed(tmp_path: Path, monkeypatch) -> None:
    # torchvision compares the md5 of each download with the official file's: a corrupted download is refused,
    # and the damaged file it leaves is then named on the next run.
    import torchvision.datasets.utils as tv_utils

    def junk(url: str, path: str, *args, **kwargs) -> None:
        Path(path).write_bytes(b"a corrupted download")

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", junk)
    dm = EquilibriumDataModule("svhn", data_dir=str(tmp_path), download=True)
    with pytest.raises(DataNotFoundError, match="download failed: RuntimeError: File not found or corrupted"):
        dm.prepare_data()
    write_svhn(tmp_path / "other")
    (tmp_path / "test_32x32.mat").write_bytes((tmp_path / "other" / "test_32x32.mat").read_bytes())
    _damaged(tmp_path, "svhn", "train_32x32.mat", "scipy.io.loadmat cannot read it")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "svhn", "digits"])
@pytest.mark.parametrize("normalize", [False, True])
def test_whole_batches_equal_torchvisions_per_image_transforms(tmp_path: Path, name: str, normalize: bool) -> None:
    # The oracle: torchvision's own per-image path (PIL -> ToTensor -> Normalize), bit for bit.
    from torchvision import transforms as T

    {"mnist": write_mnist, "cifar10": write_cifar10, "svhn": write_svhn}.get(name, lambda p: None)(tmp_path)
    dm = make_dm(name, tmp_path, normalize=normalize)
    spec = get_spec(name)
    steps = ([T.ToTensor()] if name != "digits" else []) + ([T.Normalize(spec.mean, spec.std)] if normalize else [])
    source = _SOURCES[name].load(str(tmp_path), True, False, T.Compose(steps) if steps else None)
    loader = dm.train_dataloader()
    order = list(loader.sampler)
    x, y = next(iter(loader))
    expected = torch.stack([source[i][0] for i in order[: len(y)]])
    assert torch.equal(x, expected) and x.dtype == torch.float32
    assert y.tolist() == [source[i][1] for i in order[: len(y)]] and y.dtype == torch.int64
