"""Classification metrics: accuracy and macro-F1 (the mean of the per-class F1 scores).

Macro-F1 weighs every class equally, so a classifier that ignores a minority class cannot hide
behind accuracy. A class that occurs in the labels or the predictions counts (F1 = 0 when it is
never predicted correctly); a class absent from both is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence


def classification_metrics(preds: Sequence[int], labels: Sequence[int], num_classes: int) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of integer predictions against integer labels."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not labels:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    tp = [0] * num_classes
    fp = [0] * num_classes
    fn = [0] * num_classes
    for p, y in zip(preds, labels, strict=True):
        if p == y:
            tp[y] += 1
        else:
            fp[p] += 1
            fn[y] += 1
    f1s = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in range(num_classes) if tp[c] + fp[c] + fn[c]]
    return {"accuracy": sum(tp) / len(labels), "macro_f1": sum(f1s) / len(f1s)}
