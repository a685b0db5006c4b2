"""triton: the same ONNX models behind Triton Inference Server via PyTriton.

Runs in an environment that has ``nvidia-pytriton`` (0.7.0 pins numpy < 2, so it lives
apart from the project's environment; see docs/performance.md): the orchestrator starts
``python -m benchmarks.phases triton SPEC.json`` with that environment's python, from
the checkout's root. So this module needs only numpy, onnxruntime, pytriton and
``benchmarks.loadgen`` (standard library): no other project import, not even ``cluster``
(its package imports the client and pydantic). The orchestrator picks the ports
(``spec["ports"]``) and checks the saved answers against ONNX Runtime afterwards
(``benchmarks.httpbench.check_saved_answers``), both where the project's helpers are.

ONNX Runtime runs inside the Python callable, one instance, Triton's dynamic batcher
on (500 us queue delay, the fleet's default). ``spec["provider"]``: "cpu" (default, the CPU
bench) or "cuda" (``benchmarks.gpu_triton``, the GPU bench): ONNX Runtime's CUDA provider with
the options the fleet's engine uses (``session_providers``). The request bodies are the exact bytes
the fleet phases send. Each endpoint's first answer is saved for that check.

``python -m benchmarks.phases.triton SPEC.json`` serves the same Triton until its stdin
closes (the perf-analyzer phase measures it with Triton's own load generator): it prints
one line ``TRITON_READY`` once it answers.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks import loadgen


def _say(msg: str) -> None:
    # cluster.console.say cannot be imported in PyTriton's environment (see above): the same line, here.
    print(f"[bench triton] {msg}", file=sys.stderr, flush=True)


def _np_dtype(ort_type: str):
    import numpy as np

    table = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(double)": np.float64, "tensor(float16)": np.float16}
    return table[ort_type]


# What workers/engines/onnxruntime.py does for its CUDA sessions (that module cannot be imported
# here): cuBLAS's workspace at 8 x 16 KiB unless the environment says otherwise, the arena growing
# by what is asked, no TF32 (a float32 model computes in float32).
CUBLAS_WORKSPACE = ":16:8"


def session_providers(provider: str, device_id: int = 0) -> list:
    """ONNX Runtime's providers for ``provider`` ("cpu" or "cuda"), with the fleet engine's CUDA options."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested",
                                           "use_tf32": 0})]
    raise ValueError(f"provider must be 'cpu' or 'cuda', got {provider!r}")


def make_session(onnx_path: str, provider: str = "cpu", device_id: int = 0):
    """The session Triton's callable runs: the fleet engine's session options; a CUDA session or an error."""
    import onnxruntime as ort

    if provider == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # before the first CUDA session
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime {ort.__version__} in PyTriton's environment has no CUDAExecutionProvider "
                               f"(providers: {', '.join(ort.get_available_providers())}): put onnxruntime-gpu on "
                               "its PYTHONPATH")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_path, sess_options=options, providers=session_providers(provider, device_id))
    if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError(f"ONNX Runtime could not create a CUDA session for {onnx_path}")
    return session


def bind_model(triton, name: str, onnx_path: str, max_batch: int, queue_delay_us: int, provider: str = "cpu",
               device_id: int = 0) -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    session = make_session(onnx_path, provider, device_id)
    out_names = [o.name for o in session.get_outputs()]

    def per_row_shape(node) -> tuple:
        dims = [d if isinstance(d, int) else -1 for d in node.shape[1:]]
        return tuple(dims) or (1,)  # Triton needs a per-row shape: [N] travels as [N, 1]

    @batch
    def infer(**inputs):
        results = session.run(out_names, inputs)
        return {n: (r.reshape(len(r), 1) if r.ndim == 1 else r) for n, r in zip(out_names, results)}

    triton.bind(
        model_name=name,
        infer_func=infer,
        inputs=[Tensor(name=i.name, dtype=_np_dtype(i.type), shape=per_row_shape(i)) for i in session.get_inputs()],
        outputs=[Tensor(name=o.name, dtype=_np_dtype(o.type), shape=per_row_shape(o)) for o in session.get_outputs()],
        config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)),
        strict=False,
    )


def _match_libpython() -> None:
    """Make Triton's Python backend stub load this interpreter's libpython.

    The stub is linked against ``libpython3.X.so.1.0``; without this it may find the
    system's copy (say Debian's 3.11.2) while running this interpreter's standard
    library (say pyenv's 3.11.7), and fail in ``multiprocessing`` with
    "'_thread.RLock' object has no attribute '_recursion_count'". Where there is none at
    all (a distribution's python3.12 whose libpython3.12 package is not installed, as on
    a bare Ubuntu 24.04), the stub could not start and Triton would only time out: say so.
    """
    import ctypes
    import sysconfig

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    lib = f"libpython{version}.so.1.0"
    dirs = [d for d in (sysconfig.get_config_var("LIBDIR"), str(Path(sys.base_prefix) / "lib"),
                        f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}") if d]
    libdir = next((d for d in dirs if (Path(d) / lib).exists()), None)
    if libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
        return
    try:
        ctypes.CDLL(lib)  # somewhere the dynamic loader finds by itself (ldconfig, LD_LIBRARY_PATH)
    except OSError:
        raise RuntimeError(f"{lib} is not on this host (looked in {', '.join(dirs)} and the loader's path): Triton's "
                           f"Python backend stub (PyTriton) needs the shared libpython of Python {version}. Install it "
                           f"(Debian/Ubuntu: apt-get install libpython{version}, on 24.04 libpython{version}t64) or "
                           "use a Python built with --enable-shared, and pass that python as --triton-python") from None


def _post(url: str, body: bytes, headers: dict) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _alive(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/v2/health/live", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _load_one(spec: dict, base: str, model: str, protocol: str, info: dict, levels: list, answers: dict,
              answers_dir: Path) -> list[dict]:
    import pytriton

    rows = []
    url = f"{base}/v2/models/{model}/infer"
    b = info["bodies"][protocol]
    body = Path(b["path"]).read_bytes()
    status, content, headers = _post(url, body, b["headers"])
    ans = answers_dir / f"triton-{model}-{protocol}.bin"
    ans.write_bytes(content)
    answers[f"{model}/{protocol}"] = {"status": status, "path": str(ans), "headers": headers}
    if status != 200:
        raise RuntimeError(f"triton {model} ({protocol}) answered HTTP {status}: {content[:300]!r}")
    if spec.get("warmup_s", 0) > 0:
        loadgen.run(url, body, b["headers"], concurrency=max(levels), duration_s=spec["warmup_s"], tool=spec["loadgen"])
    duration = spec["duration_s"] if len(body) < (1 << 20) else max(spec["duration_s"], 8.0)
    for c in levels:
        r = loadgen.run(url, body, b["headers"], concurrency=c, duration_s=duration,
                        rows_per_request=info["request_rows"], tool=spec["loadgen"])
        row = {"system": f"triton-{protocol}", "variant": f"pytriton {pytriton.__version__}",
               "model": model, "protocol": protocol, "batch": info["request_rows"], **r.to_dict()}
        _say(f"triton-{protocol} {model} c={c}: {row['req_per_s']:.0f} req/s, p50 {row['p50_ms']:.2f} ms, "
             f"p99 {row['p99_ms']:.2f} ms, errors {row['errors']}")
        rows.append(row)
        if r.errors and not _alive(base):
            raise RuntimeError(f"tritonserver died during the run at concurrency {c}")
    return rows


def run(spec: dict) -> dict:
    import onnxruntime
    import pytriton
    from pytriton.triton import Triton, TritonConfig

    _match_libpython()
    ports = spec["ports"]
    config = TritonConfig(http_address="127.0.0.1", http_port=ports["http"], grpc_address="127.0.0.1",
                          grpc_port=ports["grpc"], metrics_port=ports["metrics"], log_verbose=0, exit_on_error=True)
    out: dict = {"rows": [], "answers": {}, "incidents": []}
    t0 = time.monotonic()
    triton = Triton(config=config)
    try:
        for model in spec["models"]:
            info = spec["prepared"]["models"][model]
            bind_model(triton, model, info["onnx"], info["max_batch"], spec.get("queue_delay_us", 500),
                       spec.get("provider", "cpu"), spec.get("device_id", 0))
        triton.run()
        base = f"http://127.0.0.1:{ports['http']}"
        _wait_ready(base, 120)
        start_s = time.monotonic() - t0
        _say(f"triton up in {start_s:.1f} s on {base}")
        _load_all(spec, base, out)
    finally:
        try:
            triton.stop()
        except Exception as exc:  # noqa: BLE001 (a crashed server may not stop cleanly)
            out["incidents"].append(f"stopping Triton: {type(exc).__name__}: {exc}")
    out["info"] = {"start_s": start_s, "pytriton": pytriton.__version__, "onnxruntime": onnxruntime.__version__}
    return out


def _wait_ready(base: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/v2/health/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)


def _load_all(spec: dict, base: str, out: dict) -> None:
    """Every (model, protocol) with levels; stops at the first failure that leaves Triton dead."""
    answers_dir = Path(spec["answers_dir"])
    answers_dir.mkdir(parents=True, exist_ok=True)
    for model in spec["models"]:
        info = spec["prepared"]["models"][model]
        for protocol in ("binary", "json"):
            levels = spec["levels"].get(f"{model}/{protocol}", spec["levels"].get(model, []))
            if not levels:
                continue
            try:
                out["rows"] += _load_one(spec, base, model, protocol, info, levels, out["answers"], answers_dir)
            except Exception as exc:  # noqa: BLE001 (keep what was measured; say what broke)
                out["incidents"].append(f"{model} ({protocol}): {type(exc).__name__}: {exc}")
                _say(f"triton {model} ({protocol}) failed: {exc}")
                if not _alive(base):
                    out["incidents"].append("tritonserver is no longer answering; the remaining levels were not run")
                    return


def _info(spec: dict) -> dict:
    import numpy
    import onnxruntime
    import pytriton

    return {"pytriton": pytriton.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "provider": spec.get("provider", "cpu"), "python": sys.version.split()[0],
            "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def serve_until_stdin_closes(spec: dict) -> None:
    """Triton (PyTriton) with the spec's models on ``spec["ports"]``, its restricted APIs behind
    ``spec["access_token"]``, until stdin closes."""
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    _match_libpython()
    ports = spec["ports"]
    config = TritonConfig(http_address="127.0.0.1", http_port=ports["http"], grpc_address="127.0.0.1",
                          grpc_port=ports["grpc"], metrics_port=ports["metrics"], log_verbose=0, exit_on_error=True)
    triton = Triton(config=config, security_config=TritonSecurityConfig(access_token=spec["access_token"]))
    try:
        for model in spec["models"]:
            info = spec["prepared"]["models"][model]
            bind_model(triton, model, info["onnx"], info["max_batch"], spec.get("queue_delay_us", 500),
                       spec.get("provider", "cpu"), spec.get("device_id", 0))
        triton.run()
        _wait_ready(f"http://127.0.0.1:{ports['http']}", 120)
        print("TRITON_INFO " + json.dumps(_info(spec)), flush=True)
        print("TRITON_READY", flush=True)
        sys.stdin.read()
    finally:
        triton.stop()


if __name__ == "__main__":
    serve_until_stdin_closes(json.loads(Path(sys.argv[1]).read_text()))
