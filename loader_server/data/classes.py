"""How many classes a data set has: what the handshake tells trainers as `num_classes`."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["count_classes"]


def count_classes(dataset: Any) -> int | None:
    """Class names' count, else max label + 1 for non-negative integer labels, else None.

    None for labels that are not class numbers (floats, vectors, negative values). A subset
    (an object with a `parent`, as ``--subset`` serves) counts the classes of the whole data
    set, so a training and a validation server of one data set agree. Computed once, when the
    server starts.
    """
    while getattr(dataset, "parent", None) is not None:
        dataset = dataset.parent
    if dataset.class_names:
        return len(dataset.class_names)
    labels = np.asarray(dataset.labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return None
    low, high = int(labels.min()), int(labels.max())
    return high + 1 if low >= 0 else None
