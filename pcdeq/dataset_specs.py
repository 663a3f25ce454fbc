"""Static facts about each dataset name: input shape, classes, normalisation, augmentation.

This is the single source of input shapes for the architecture builders, the synthetic data and the data
module. It needs nothing beyond the standard library, so the model API can use it without the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from pcdeq.errors import ConfigError


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one dataset name.

    Attributes:
        shape: input shape (C, H, W).
        num_classes: number of labels.
        mean, std: per-channel normalisation (reference values).
        augment: random crop (padding 4) + horizontal flip on the training set.
        train_size: number of training images (checks ``dataset.val_size`` before any file is read).
    """

    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    train_size: int | None = None

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

DATASET_SPECS: dict[str, DatasetSpec] = {
    # scikit-learn's 8x8 handwritten digits, pixel values scaled from 0..16 to [0, 1];
    # mean / std measured on the fixed 1437-image training split
    "digits": DatasetSpec((1, 8, 8), 10, (0.3054,), (0.3761,), train_size=1437),
    "mnist": DatasetSpec((1, 28, 28), 10, (0.1307,), (0.3081,), train_size=60000),
    "svhn": DatasetSpec((3, 32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), train_size=73257),
    "cifar10": DatasetSpec((3, 32, 32), 10, CIFAR_MEAN, CIFAR_STD, train_size=50000),
    "cifar10_aug": DatasetSpec((3, 32, 32), 10, CIFAR_MEAN, CIFAR_STD, augment=True, train_size=50000),
}

def get_spec(name: str) -> DatasetSpec:
    """Spec of a dataset by name.

    Args:
        name: a key of ``DATASET_SPECS``.

    Returns:
        The dataset's spec.

    Raises:
        ConfigError: unknown name; the message lists the valid names.
    """
    try:
        return DATASET_SPECS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASET_SPECS)}") from None

