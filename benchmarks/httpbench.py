"""HTTP measurements the phases share: checking an answer against ONNX Runtime, and the load matrix.

Every endpoint is checked with the benchmark's own payload before it is loaded, so a
number in the report is never the speed of wrong answers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import requests

from workers.kserve.client_codec import decode_response

from benchmarks import loadgen
from benchmarks.common import model_inputs, progress, reference_outputs

LARGE_BODY = 1 << 20


def check_answer(model: str, content: bytes, headers, prepared: dict) -> str | None:
    """None when an HTTP answer holds the right outputs for the bench payload, else why not."""
    try:
        lower = {k.lower(): v for k, v in dict(headers).items()}
        _, arrays = decode_response(content, lower.get("inference-header-content-length"))
    except Exception as exc:  # noqa: BLE001 (any decode failure is a wrong answer)
        return f"undecodable answer: {type(exc).__name__}: {exc}: {content[:200]!r}"
    spec = prepared["models"][model]
    reference = reference_outputs(spec["onnx"], model_inputs(model, spec["request_rows"]))
    for name, want in reference.items():
        got = arrays.get(name)
        if got is None:
            return f"output {name!r} missing (got {sorted(arrays)})"
        got = np.asarray(got).reshape(want.shape)
        ok = np.array_equal(got, want) if want.dtype.kind in "iub" else np.allclose(got, want, rtol=1e-3, atol=1e-4)
        if not ok:
            return f"output {name!r} differs from ONNX Runtime's"
    return None


def check_saved_answers(answers: dict, prepared: dict) -> dict[str, str]:
    """Problems with answers saved as files (the Triton phase's, checked here where the codec is):
    ``{"model/protocol": {"path", "headers"}}`` -> ``{"model/protocol": problem}``."""
    wrong = {}
    for key, ans in answers.items():
        problem = check_answer(key.split("/")[0], Path(ans["path"]).read_bytes(), ans["headers"], prepared)
        if problem:
            wrong[key] = problem
    return wrong


def verify_endpoint(url: str, model: str, protocol: str, prepared: dict, timeout_s: float = 60) -> None:
    body_info = prepared["models"][model]["bodies"][protocol]
    body = Path(body_info["path"]).read_bytes()
    r = requests.post(url, data=body, headers=body_info["headers"], timeout=timeout_s)
    if r.status_code != 200:
        raise RuntimeError(f"{url} ({protocol}) answered HTTP {r.status_code}: {r.text[:300]}")
    problem = check_answer(model, r.content, r.headers, prepared)
    if problem:
        raise RuntimeError(f"{url} ({protocol}): {problem}")


def levels_of(spec: dict, model: str, protocol: str) -> list[int]:
    """The concurrency levels of (model, protocol): ``levels["model/protocol"]``, else ``levels["model"]``."""
    return spec["levels"].get(f"{model}/{protocol}", spec["levels"].get(model, []))


def http_matrix(system: str, variant: str, base_url: str, spec: dict, *, protocols=("binary", "json"),
                path=lambda m: f"/v2/models/{m}/infer") -> list[dict]:
    """Verify, warm up, then load every (model, protocol, concurrency) of ``spec``."""
    rows = []
    for model in spec["models"]:
        for protocol in protocols:
            levels = levels_of(spec, model, protocol)
            if levels:
                url = base_url + path(model)
                verify_endpoint(url, model, protocol, spec["prepared"])
                rows += _load_levels(system, variant, url, spec, model, protocol, levels)
    return rows


def _load_levels(system: str, variant: str, url: str, spec: dict, model: str, protocol: str,
                 levels: list[int]) -> list[dict]:
    info = spec["prepared"]["models"][model]
    body_info = info["bodies"][protocol]
    body = Path(body_info["path"]).read_bytes()
    # A multi-MB body (cnn-small as JSON) takes about a second a request: run long
    # enough that wrk completes some (it drops what is in flight at the end).
    duration = spec["duration_s"] if len(body) < LARGE_BODY else max(spec["duration_s"], 8.0)
    if spec.get("warmup_s", 0) > 0:
        loadgen.run(url, body, body_info["headers"], concurrency=max(levels), duration_s=spec["warmup_s"],
                    tool=spec["loadgen"])
    rows = []
    for c in levels:
        r = loadgen.run(url, body, body_info["headers"], concurrency=c, duration_s=duration,
                        rows_per_request=info["request_rows"], tool=spec["loadgen"])
        row = {"system": f"{system}-{protocol}" if system.startswith("fleet-http") else system,
               "variant": variant, "model": model, "protocol": protocol, "batch": info["request_rows"],
               **r.to_dict()}
        if spec.get("shipped"):
            row["shipped"] = True  # the fleet as it runs by default: what the targets judge
        progress(f"{row['system']} [{variant}] {model} c={c}: {row['req_per_s']:.0f} req/s, "
                 f"{row['rows_per_s']:.0f} rows/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                 f"errors {row['errors']}")
        rows.append(row)
    return rows
