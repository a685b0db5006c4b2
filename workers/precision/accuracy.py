"""Accuracy of a built artifact against the float32 reference, and the mode's threshold.

Every build compares its artifact with the float32 reference (``compare_outputs``)
and fails when the loss is over the mode's threshold (``check_accuracy``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.errors import BuildError, InvalidConfig

# Accuracy thresholds per mode (issue 4). int8 is judged by top-1 agreement where the
# model has a classifier output; without one, by relative L2 error.
FLOAT32_MAX_REL_L2 = 1e-4
FLOAT16_MAX_REL_L2 = 1e-2
INT8_MIN_TOP1_AGREEMENT = 0.97
INT8_MAX_REL_L2_WITHOUT_CLASSIFIER = 5e-2


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, Any]:
    """How far ``candidate`` is from the float32 ``reference``, per output and overall.

    Float outputs: max absolute error and relative L2 error (||c - r|| / ||r||);
    2-D float outputs (classifier probabilities or logits) also top-1 agreement;
    integer outputs (labels): the fraction that agree exactly. The overall numbers are
    the worst over the outputs and go into the manifest.
    """
    missing = sorted(set(reference) - set(candidate))
    if missing:
        raise BuildError(f"the candidate artifact does not produce output(s) {missing}")
    per_output: dict[str, dict[str, float]] = {}
    for name in sorted(reference):
        ref, cand = np.asarray(reference[name]), np.asarray(candidate[name])
        if ref.shape != cand.shape:
            raise BuildError(f"output '{name}': shape {list(cand.shape)} differs from the reference's {list(ref.shape)}")
        metrics: dict[str, float] = {}
        if ref.dtype.kind == "f":
            r, c = ref.astype(np.float64), cand.astype(np.float64)
            diff = c - r
            metrics["max_abs_error"] = float(np.max(np.abs(diff))) if diff.size else 0.0
            norm = float(np.linalg.norm(r))
            metrics["rel_l2_error"] = float(np.linalg.norm(diff)) / norm if norm > 0 else float(np.linalg.norm(diff))
            if ref.ndim == 2 and ref.shape[1] > 1:
                metrics["top1_agreement"] = float(np.mean(np.argmax(r, axis=1) == np.argmax(c, axis=1)))
        elif ref.dtype.kind in "iub":
            metrics["exact_agreement"] = float(np.mean(ref == cand)) if ref.size else 1.0
        else:
            metrics["exact_agreement"] = float(np.mean(ref == cand)) if ref.size else 1.0
        per_output[name] = metrics
    summary: dict[str, Any] = {"outputs": per_output}
    for key, worst in (("max_abs_error", max), ("rel_l2_error", max), ("top1_agreement", min), ("exact_agreement", min)):
        values = [m[key] for m in per_output.values() if key in m]
        if values:
            summary[key] = worst(values)
    samples = {int(np.asarray(a).shape[0]) for a in reference.values() if np.asarray(a).ndim}
    if len(samples) == 1:
        summary["samples"] = samples.pop()
    return summary


def accuracy_threshold(precision: str, metrics: dict[str, Any]) -> tuple[str, str, float]:
    """(metric, 'max' | 'min', bound) that ``precision`` is judged by, given what ``metrics`` holds."""
    if "rel_l2_error" not in metrics and "exact_agreement" in metrics:
        # integer outputs only (labels, counts): judged by how often they agree exactly
        return "exact_agreement", "min", {"float32": 1.0, "float16": 0.99}.get(precision, INT8_MIN_TOP1_AGREEMENT)
    if precision == "float32":
        return "rel_l2_error", "max", FLOAT32_MAX_REL_L2
    if precision == "float16":
        return "rel_l2_error", "max", FLOAT16_MAX_REL_L2
    if precision in ("int8", "int8_calib"):
        if "top1_agreement" in metrics:
            return "top1_agreement", "min", INT8_MIN_TOP1_AGREEMENT
        return "rel_l2_error", "max", INT8_MAX_REL_L2_WITHOUT_CLASSIFIER
    raise InvalidConfig(f"unknown precision {precision!r}")


def check_accuracy(precision: str, metrics: dict[str, Any], accept_loss: bool = False) -> dict[str, Any]:
    """Raise BuildError when ``metrics`` (from compare_outputs) break the mode's threshold.

    Returns what was checked, for the manifest: metric, bound, value, passed, accepted.
    """
    metric, kind, bound = accuracy_threshold(precision, metrics)
    if metric not in metrics:
        raise BuildError(f"cannot check {precision} accuracy: the comparison has no {metric} (no float output?)")
    value = float(metrics[metric])
    passed = value <= bound if kind == "max" else value >= bound
    verdict = {"metric": metric, "bound": bound, "kind": kind, "value": value, "passed": passed, "accepted_loss": False}
    if passed:
        return verdict
    if accept_loss:
        verdict["accepted_loss"] = True
        return verdict
    relation = "over the maximum" if kind == "max" else "under the minimum"
    raise BuildError(
        f"{precision} artifact loses too much accuracy: {metric} {value:.6g} is {relation} {bound:g} "
        f"against float32 on {metrics.get('samples', 'the held-out')} samples; build another precision, "
        f"or pass --accept-accuracy-loss to keep it anyway"
    )
