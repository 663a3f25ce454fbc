"""The Lightning data module: every dataset name of :data:`pcdeq.dataset_specs.DATASET_SPECS` through one class.

A small table (``_SOURCES``) maps each name to the files it needs on disk and a function that loads its train
or test split; the static facts (shape, classes, normalisation) come from :mod:`pcdeq.dataset_specs`.

Files are read by torchvision's own loaders. A file that is empty, truncated or damaged is named in one
:class:`~pcdeq.errors.DataError` with the fix, instead of the loader's traceback: MNIST's IDX headers are checked
against the file sizes before reading (magic, dimensions, 28x28 images, as many labels as images); a CIFAR-10
pickle or an SVHN ``.mat`` file that torchvision cannot read is found by checking each file of the split in
turn. Downloads are checksummed by torchvision (the md5 of each archive or ``.mat`` file).
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import cast

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate, random_split
from torchvision import datasets, transforms

from pcdeq.dataset_specs import get_spec
from pcdeq.errors import ConfigError, DataError, DataNotFoundError


def _len(dataset: Dataset) -> int:
    """Length of a map-style dataset (every dataset here defines __len__; torch's Dataset type does not)."""
    return len(cast(Sized, dataset))


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch, drawn from a generator seeded with (seed, epoch).

    Args:
        n: dataset length.
        seed: base seed.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _TensorImages(Dataset):
    """Images held as one tensor [N, C, H, W] (uint8 pixels or floats in [0, 1]) with int64 labels.

    Without a ``transform`` a whole batch is fetched at once (``__getitems__``: one indexing, one scaling, one
    normalisation), which gives exactly the values torchvision's per-image ``ToTensor`` and ``Normalize`` give
    (the same operations, applied to the batch), at a fraction of the cost: per-image fetching cost about as
    much as a linear MNIST training step. ``transform`` (random augmentation) acts on one image at a time.

    Args:
        images: uint8 pixels (scaled by 1/255, as ToTensor) or floats.
        labels: int64 labels.
        mean, std: per-channel normalisation, or None.
        transform: a per-image transform of the float image; batches are then fetched image by image.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, transform: Callable | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        shape = (-1, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(shape) if mean is not None else None
        self.std = torch.tensor(std, dtype=torch.float32).view(shape) if std is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def _float(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).div(255) if images.dtype == torch.uint8 else images.to(torch.float32)
        if self.mean is not None and self.std is not None:
            x = x.sub(self.mean).div(self.std)
        return x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self._float(self.images[index])
        # int labels, as the torchvision datasets return them, so batches collate the same way
        return (self.transform(image) if self.transform else image), int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | list:
        if self.transform is not None:
            return [self[i] for i in indices]
        at = torch.as_tensor(indices)
        return self._float(self.images[at]), self.labels[at]


def _collate(data: tuple[torch.Tensor, torch.Tensor] | list) -> object:
    """A batch fetched whole by ``_TensorImages.__getitems__`` as it is; anything else as PyTorch collates it."""
    return data if isinstance(data, tuple) else default_collate(data)


def _tensor_images(dataset: Dataset, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
                   ) -> _TensorImages:
    """The pixels of a loaded torchvision dataset (MNIST, CIFAR-10, SVHN) as one uint8 tensor [N, C, H, W]."""
    if isinstance(dataset, _TensorImages):
        return _TensorImages(dataset.images, dataset.labels, mean, std)
    data = dataset.data  # type: ignore[attr-defined]
    if isinstance(data, torch.Tensor):  # MNIST: [N, H, W]
        images = data.unsqueeze(1)
    elif data.shape[-1] in (1, 3):  # CIFAR-10: [N, H, W, C]
        images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    else:  # SVHN: [N, C, H, W]
        images = torch.from_numpy(data)
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels  # type: ignore[attr-defined]
    return _TensorImages(images, torch.as_tensor(labels, dtype=torch.int64), mean, std)


class _CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR10 with the local files checked for presence instead of md5.

    torchvision compares the md5 of each batch file (``_check_integrity``) and of ``batches.meta``
    (``_load_meta``) with the official release before reading them, so no other file in the same format
    (such as the small files the tests write) can be loaded. With ``md5=None``, torchvision's
    ``check_integrity`` is a plain existence test. A damaged file still fails when it is unpickled or
    reshaped, and a download still checks the archive against ``tgz_md5``.
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _SVHNFiles(datasets.SVHN):
    """torchvision's SVHN with the local ``.mat`` file checked for presence instead of md5.

    torchvision's SVHN refuses a ``.mat`` file whose md5 differs from the official one; past that check it
    reads the file with ``scipy.io.loadmat`` and maps label 10 to digit 0, which is kept as is. A download
    (``download_url``) still verifies the md5 of the file it fetches.
    """

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


def _load_digits(root: str, train: bool, download: bool, transform: Callable | None) -> Dataset:
    # scikit-learn ships this dataset, so root and download are unused; imported here because only this
    # dataset needs it (a second of import time for every other run)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # fixed stratified split, so that every run and every model sees the same 1437 / 360 images
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.images, bunch.target, test_size=360, stratify=bunch.target, random_state=0
    )
    x, y = (x_train, y_train) if train else (x_test, y_test)
    images = torch.from_numpy(x).float().div(16.0).unsqueeze(1)  # pixels 0..16 -> [0, 1], shape N x 1 x 8 x 8
    return _TensorImages(images, torch.from_numpy(y).long(), transform=transform)


# ---------------------------------------------------------------- damaged files

_LAYOUT = {
    "mnist": "<data_dir>/MNIST/raw/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte (uncompressed)",
    "cifar10": "<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (the python version)",
    "svhn": "<data_dir>/train_32x32.mat and test_32x32.mat (the cropped-digits format)",
}


def _damaged(dataset: str, path: str, problem: str) -> DataError:
    return DataError(f"{dataset} file {os.path.abspath(path)} is damaged: {problem}; fix: delete it and download "
                     "it again (dataset.download=true, online; torchvision checks its md5), or copy an intact one "
                     f"there. Expected layout: {_LAYOUT[dataset]}")


def _check_size(dataset: str, path: str) -> int:
    size = os.path.getsize(path)
    if size == 0:
        raise _damaged(dataset, path, "it is empty (0 bytes)")
    return size


def check_idx(path: str, ndim: int, item_shape: tuple[int, ...] = ()) -> int:
    """Check an IDX file of unsigned bytes (MNIST) against its header; return the number of items.

    Raises:
        DataError: empty, not an IDX file of ``ndim`` dimensions, items of another shape, or a size that differs
            from the header's (truncated, or bytes appended).
    """
    size = _check_size("mnist", path)
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim or header[:2] != b"\0\0" or header[2] != 0x08 or header[3] != ndim:
        raise _damaged("mnist", path, f"not an IDX file of {ndim}-d unsigned bytes (it starts with "
                       f"{header[:4].hex() or 'nothing'}, expected 0000080{ndim})")
    dims = struct.unpack(f">{ndim}I", header[4:])
    if item_shape and tuple(dims[1:]) != item_shape:
        raise _damaged("mnist", path, f"items of shape {tuple(dims[1:])}, expected {item_shape}")
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise _damaged("mnist", path, f"{what}: {size} bytes, its header announces {dims[0]} items = {expected} "
                       "bytes")
    return dims[0]


def _cifar_problem(path: str, meta: bool) -> str | None:
    """What is wrong with one CIFAR-10 python pickle, or None."""
    if os.path.getsize(path) == 0:
        return "it is empty (0 bytes)"
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as e:  # any unpickling failure: truncation raises EOFError, garbage UnpicklingError, ...
        return f"it cannot be unpickled ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(entry, dict):
        return f"it holds a {type(entry).__name__}, not a dict"
    if meta:
        return None if len(entry.get("label_names", ())) == 10 else "no list of 10 label_names"
    data, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    if data is None or labels is None:
        return "no 'data' or no 'labels' entry"
    if getattr(data, "ndim", 0) != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
        return f"data of shape {getattr(data, 'shape', '?')} for {len(labels)} labels, expected ({len(labels)}, 3072)"
    return None


def _svhn_problem(path: str) -> str | None:
    """What is wrong with one SVHN .mat file, or None."""
    import scipy.io  # only SVHN needs scipy; kept out of the import time of every other run

    if os.path.getsize(path) == 0:
        return "it is empty (0 bytes)"
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, MatReadError, TypeError, zlib errors... for damaged files
        return f"scipy.io.loadmat cannot read it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        return "no 'X' or no 'y' variable"
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.size:
        return f"X of shape {x.shape} for {y.size} labels, expected (32, 32, 3, {y.size})"
    return None


def _load_checked(dataset: str, root: str, files: list[tuple[str, Callable[[str], str | None]]],
                  load: Callable[[], Dataset]) -> Dataset:
    """Run torchvision's ``load``; if it fails, name the damaged file among ``files`` (path, check)."""
    for name, _ in files:
        _check_size(dataset, os.path.join(root, name))
    try:
        return load()
    except Exception as err:  # torchvision's own error for a damaged file: find which file and say how to fix it
        for name, check in files:
            problem = check(os.path.join(root, name))
            if problem:
                raise _damaged(dataset, os.path.join(root, name), problem) from None
        summary = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{dataset} files in {os.path.abspath(root)} cannot be read ({type(err).__name__}: "
                        f"{summary}); fix: delete them and download again (dataset.download=true), or replace "
                        f"them. Expected layout: {_LAYOUT[dataset]}") from None


# ---------------------------------------------------------------- loaders


def _load_mnist(root: str, train: bool, download: bool, transform: Callable | None) -> Dataset:
    if not download:  # a download writes the files first; check them before torchvision reads them
        prefix = os.path.join(root, "MNIST", "raw", "train" if train else "t10k")
        n_images = check_idx(f"{prefix}-images-idx3-ubyte", 3, (28, 28))
        n_labels = check_idx(f"{prefix}-labels-idx1-ubyte", 1)
        if n_images != n_labels:
            raise _damaged("mnist", f"{prefix}-labels-idx1-ubyte", f"{n_labels} labels for {n_images} images")
    return datasets.MNIST(root, train=train, download=download, transform=transform)


def _load_svhn(root: str, train: bool, download: bool, transform: Callable | None) -> Dataset:
    # the "extra" split is deliberately unused: training reads the "train" split only
    split = "train" if train else "test"
    if download:
        return _SVHNFiles(root, split=split, download=True, transform=transform)
    return _load_checked("svhn", root, [(f"{split}_32x32.mat", _svhn_problem)],
                         lambda: _SVHNFiles(root, split=split, download=False, transform=transform))


def _load_cifar10(root: str, train: bool, download: bool, transform: Callable | None) -> Dataset:
    if download:
        return _CIFAR10Files(root, train=train, download=True, transform=transform)
    names = [name for name, _ in (_CIFAR10Files.train_list if train else _CIFAR10Files.test_list)]
    files = [(f"cifar-10-batches-py/{n}", lambda p: _cifar_problem(p, meta=False)) for n in names]
    files.append(("cifar-10-batches-py/batches.meta", lambda p: _cifar_problem(p, meta=True)))
    return _load_checked("cifar10", root, files,
                         lambda: _CIFAR10Files(root, train=train, download=False, transform=transform))


@dataclass(frozen=True)
class _Source:
    """Where a dataset comes from.

    Attributes:
        load: (root, train, download, transform) -> dataset of (image, label).
        files: paths relative to the data directory that must exist; empty when nothing is read from disk.
        pil: whether ``load`` yields PIL images (they need ``ToTensor``) rather than tensors.
    """

    load: Callable[[str, bool, bool, Callable | None], Dataset]
    files: tuple[str, ...] = ()
    pil: bool = True


_CIFAR_FILES = tuple(
    f"cifar-10-batches-py/{name}"
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
)
_SOURCES: dict[str, _Source] = {
    "digits": _Source(_load_digits, pil=False),
    "mnist": _Source(
        _load_mnist,
        tuple(
            f"MNIST/raw/{split}-{kind}"
            for split in ("train", "t10k")
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        ),
    ),
    "svhn": _Source(_load_svhn, ("train_32x32.mat", "test_32x32.mat")),
    "cifar10": _Source(_load_cifar10, _CIFAR_FILES),
    "cifar10_aug": _Source(_load_cifar10, _CIFAR_FILES),
}


class EquilibriumDataModule(L.LightningDataModule):
    """Train / validation / test loaders for one dataset name of ``DATASET_SPECS``.

    Files are read from ``data_dir`` in each dataset's usual torchvision layout. They are downloaded only by
    ``prepare_data`` and only when ``download`` is true; missing files raise ``DataNotFoundError``.
    Synthetic data is served only when ``synthetic`` is true, never in place of missing files.

    Args:
        name: dataset name (a key of ``DATASET_SPECS``).
        data_dir: directory holding the dataset files.
        batch_size: training batch size.
        eval_batch_size: validation / test batch size; defaults to ``batch_size``.
        download: allow ``prepare_data`` to download missing files.
        synthetic: serve random images of the dataset's shape instead of the real data.
        synthetic_size: (train, test) sizes of the synthetic data.
        normalize: apply ``Normalize(spec.mean, spec.std)`` after scaling pixels to [0, 1].
        val_size: number of training samples held out for validation (0: no validation).
        num_workers: DataLoader worker processes.
        seed: seeds the synthetic data, the validation split and the training shuffle.
        pin_memory: DataLoader ``pin_memory``.
    """

    def __init__(
        self,
        name: str,
        data_dir: str | os.PathLike[str] = "data",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        download: bool = True,
        synthetic: bool = False,
        synthetic_size: tuple[int, int] = (1024, 256),
        normalize: bool = True,
        val_size: int = 0,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.spec = get_spec(name)  # ConfigError listing the valid names
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.save_hyperparameters()
        self.name = name
        self.num_classes = self.spec.num_classes
        self.input_shape = self.spec.shape
        self.data_dir = os.path.expanduser(os.fspath(data_dir))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.download = download
        self.synthetic = synthetic
        self.synthetic_size = tuple(synthetic_size)
        self.normalize = normalize
        self.val_size = val_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self._source = _SOURCES[name]
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ---------------------------------------------------------------- files

    def missing_files(self) -> list[str]:
        """Expected files that are not in ``data_dir`` (none for digits or synthetic data).

        Returns:
            Paths relative to ``data_dir``.
        """
        if self.synthetic:
            return []
        return [f for f in self._source.files if not os.path.isfile(os.path.join(self.data_dir, f))]

    def _check_data_dir(self) -> None:
        """The data directory, if it exists, is a directory (not a file)."""
        if self.synthetic or not self._source.files:
            return
        path = os.path.abspath(self.data_dir)
        if os.path.exists(path) and not os.path.isdir(path):
            first = self._source.files[0]
            raise DataError(f"the data directory {path} is a file, not a directory; fix: point paths.data_dir=... "
                            f"(or PCDEQ_DATA_DIR) at the directory that holds {first} and the other {self.name} "
                            "files, or move that file away")

    def _not_found(self, reason: str) -> DataNotFoundError:
        missing = self.missing_files()
        return DataNotFoundError(
            f"{self.name} data not found in {os.path.abspath(self.data_dir)} ({reason}).\n"
            f"  missing: {', '.join(missing)}\n"
            "  fix: run once online with dataset.download=true, or point paths.data_dir=... "
            "(or the env var PCDEQ_DATA_DIR) at a directory holding these files, "
            "or use dataset.synthetic=true for a smoke run on random data."
        )

    def prepare_data(self) -> None:
        """Download the dataset if files are missing and ``download`` is true.

        Raises:
            DataNotFoundError: files are missing and downloading is off or fails.
        """
        self._check_data_dir()
        if not self.missing_files():
            return
        if not self.download:
            raise self._not_found("download=False")
        try:
            for train in (True, False):  # SVHN fetches one file per split
                self._source.load(self.data_dir, train, True, None)
        except Exception as err:  # offline, torchvision raises URLError, RuntimeError, socket errors...
            summary = " ".join(str(err).split())  # torchvision's mirror report spans several lines
            raise self._not_found(f"download failed: {type(err).__name__}: {summary}") from None
        if self.missing_files():
            raise self._not_found("download finished but files are still missing")

    # ---------------------------------------------------------------- datasets

    def _normalisation(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        return (self.spec.mean, self.spec.std) if self.normalize else (None, None)

    def _transform(self, train: bool) -> Callable | None:
        """The per-image transform of the augmented training set (images held as tensors need none)."""
        steps: list[Callable] = []
        if self._source.pil and not self.synthetic:
            steps.append(transforms.ToTensor())  # uint8 PIL image -> float CHW in [0, 1]
        if train and self.spec.augment:
            # before normalising, so that the 4-pixel padding is black as in the usual CIFAR recipe
            steps += [
                transforms.RandomCrop(self.input_shape[1:], padding=4),
                transforms.RandomHorizontalFlip(),
            ]
        if self.normalize:
            steps.append(transforms.Normalize(self.spec.mean, self.spec.std))
        return transforms.Compose(steps) if steps else None

    def _synthetic(self, train: bool, transform: Callable | None) -> _TensorImages:
        # Train and test come from one generator, so the pair is fixed by the seed. Each class has a random
        # prototype image mixed half and half with noise: learnable, so a smoke run can show accuracy above
        # chance, while shapes and value range (pixel-like, [0, 1)) match the real data for throughput runs.
        generator = torch.Generator().manual_seed(self.seed)
        prototypes = torch.rand((self.num_classes, *self.input_shape), generator=generator)
        parts = []
        for n in self.synthetic_size:
            labels = torch.randint(self.num_classes, (n,), generator=generator)
            noise = torch.rand((n, *self.input_shape), generator=generator)
            images = 0.5 * prototypes[labels] + 0.5 * noise
            parts.append(_TensorImages(images, labels, transform=transform))
        return parts[0 if train else 1]

    def _load(self, train: bool) -> Dataset:
        """The split as a tensor dataset; the augmented training set keeps a per-image transform."""
        augment = train and self.spec.augment
        if self.synthetic:
            raw: Dataset = self._synthetic(train, self._transform(train) if augment else None)
        else:
            self._check_data_dir()
            if self.missing_files():
                raise self._not_found("call prepare_data() with download=True to fetch them")
            raw = self._source.load(self.data_dir, train, False, self._transform(train) if augment else None)
        return raw if augment else _tensor_images(raw, *self._normalisation())

    def _split(self, full: Dataset) -> tuple[Dataset, Dataset | None]:
        if self.val_size == 0:
            return full, None
        n = _len(full)
        if self.val_size >= n:
            raise ConfigError(
                f"val_size={self.val_size} leaves no training data ({self.name} has {n} training samples)"
            )
        generator = torch.Generator().manual_seed(self.seed)
        train, val = random_split(full, [n - self.val_size, self.val_size], generator=generator)
        if self.spec.augment:
            # the held-out part is scored like test data, so it must not get the training crop/flip
            val = Subset(_tensor_images(full, *self._normalisation()), val.indices)
        return train, val

    def setup(self, stage: str | None = None) -> None:
        """Load the splits a stage needs (all of them when ``stage`` is None); repeated calls reuse them.

        Args:
            stage: Lightning stage: "fit", "validate", "test", "predict" or None.
        """
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.train_set, self.val_set = self._split(self._load(train=True))
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._load(train=False)

    # ---------------------------------------------------------------- loaders

    def _loader(self, dataset: Dataset | None, stage: str, train: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for its dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            # The order of epoch e depends only on (seed, e): a run resumed from a checkpoint sees the same batches
            # as an uninterrupted one (Lightning calls set_epoch on the sampler).
            sampler=EpochShuffleSampler(_len(dataset), self.seed) if train else None,
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (seeded by ``seed``).

        Returns:
            The training DataLoader.
        """
        return self._loader(self.train_set, "fit", train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches of the held-out training samples.

        Returns:
            The validation DataLoader, or an empty list when ``val_size`` is 0 (Lightning then skips
            validation).
        """
        if self.val_size == 0:
            return []
        return self._loader(self.val_set, "validate")

    def test_dataloader(self) -> DataLoader:
        """Test batches, in file order.

        Returns:
            The test DataLoader.
        """
        return self._loader(self.test_set, "test")


def dataset_summary(dm: EquilibriumDataModule) -> str:
    """One line describing the loaded splits, for progress output.

    Args:
        dm: a data module (sizes are shown for the splits ``setup`` has loaded).

    Returns:
        e.g. ``"mnist: train 60000, test 10000 | 1x28x28, 10 classes, normalised | data/"``.
    """
    splits = (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set))
    sizes = ", ".join(f"{key} {_len(ds)}" for key, ds in splits if ds is not None) or "not set up"
    shape = "x".join(map(str, dm.input_shape))
    norm = "normalised" if dm.normalize else "raw [0, 1]"
    if dm.synthetic:
        origin = f"synthetic (seed {dm.seed})"
    else:
        origin = os.path.abspath(dm.data_dir) if dm._source.files else "bundled with scikit-learn"
    return f"{dm.name}: {sizes} | {shape}, {dm.num_classes} classes, {norm} | {origin}"
