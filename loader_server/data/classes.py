"""How many classes a data set has: what the handshake tells trainers as `num_classes`."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["count_classes", "negative_labels_note"]


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


def negative_labels_note(dataset: Any) -> str | None:
    """Why `count_classes` gives None for integer class labels some of which are negative (-1 often marks
    an unlabelled sample), in words for the server's start-up warning; None when that is not the case."""
    while getattr(dataset, "parent", None) is not None:
        dataset = dataset.parent
    if dataset.class_names:
        return None
    labels = np.asarray(dataset.labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return None
    negative = np.flatnonzero(labels < 0)
    if negative.size == 0:
        return None
    first = int(negative[0])
    return (f"{negative.size} of {labels.size} samples have a negative label (the first: {dataset.describe(first)}, "
            f"label {int(labels[first])}), so this server announces no num_classes (client.num_classes is None) "
            f"and a classifier sized from it cannot be built; the other labels go up to {int(labels.max())}. "
            "If they mark unlabelled samples, leave those lines out of the list (or give the model its class "
            "count yourself and a loss that ignores them)")
