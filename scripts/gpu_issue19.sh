#!/usr/bin/env bash
# Issue 19's measurements on a lent GPU host, one step per `run` call (each must end within 10 minutes).
# The packages come first, made here and carried one part per call (the GPU host has no internet):
#   bash ../shared/tools/pack-wheels.sh onnxruntime-gpu "ray[serve,data]==2.60.0" "numpy>=1.26,<3" "onnx>=1.17" \
#     "nvidia-ml-py>=12.535" "cuda-python>=12.6" "pydantic>=2.5,<3" "pyyaml>=6" "requests>=2.31" "aiohttp>=3.9" \
#     skl2onnx py-spy httptools onnxconverter-common        # .wheelparts/p0..p6 -> /tmp/site
#   bash scripts/pack_triton_env.sh                         # .wheelparts/t0..t1 -> /tmp/triton-venv (PyTriton)
#   wrk and its libraries (apt-get download wrk libluajit-5.1-2) -> .wheelparts/wrk, with an env.sh for PATH
# Then, from the repository root:
#
#   bash scripts/gpu_issue19.sh pin [--idle-only]  # benchmarks.gpu_pin: pinning's cost, alone and under load (~40 s)
#   [LOOPS=4] bash scripts/gpu_issue19.sh full  # gpu_bench: bare at its best, every fleet path, the 2M-row job, Triton (~3 min)
#   bash scripts/gpu_issue19.sh job MODE   # the 2M-row job alone, client_shm_pinning MODE (~1 min)
#   (full and job: the job runs once per PART_ROWS (rows per part, comma-separated, default auto: the job's
#   default, 4,096 on the big MLP) and IN_FLIGHT (parts in flight per worker, default the job's: 8); PIN_THREADS=N:
#   the workers' pin threads)
#   [LOOPS=4] bash scripts/gpu_issue19.sh binary [MS]  # binary bodies alone, GIL switch MS, py-spy on the worker (~1 min)
#   bash scripts/gpu_issue19.sh cnn     # cnn-small over HTTP, fleet and wrk on separate cores (~2 min)
#   bash scripts/gpu_issue19.sh tests   # pytest -m gpu (~3 min)
#   [LOOPS=4] bash scripts/gpu_issue19.sh all  # full, cnn and tests, one archive (~7 min: one device call)
#
# Results go under $OUT (the device call's output folder), or bench-results/.
set -euo pipefail
export PYTHONPATH="/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
scratch=/dev/shm/b  # the job's 2 GB input and 32 GB of outputs: the host's memory, not its 64 GB disk
rm -rf "$scratch" && mkdir -p "$scratch"
triton=(--triton-python /tmp/triton-venv/bin/python3
        --triton-pythonpath /tmp/triton-venv/lib/python3.12/site-packages:/tmp/site)
job=(--batch-job-rows 2000000 --batch-job-repeat 1024 --batch-job-in-flight "${IN_FLIGHT:-}"
     --batch-job-part-rows "${PART_ROWS:-auto}"
     ${PIN_THREADS:+--shm-pin-threads "$PIN_THREADS"})

case "${1:-}" in
  pin)   python3 -m benchmarks.gpu_pin --out "$OUT" ${2:+"$2"} ;;
  full)  TMPDIR=$scratch python3 scripts/gpu_bench.py --duration 3 --batches 1,256 --levels 1:64/256:8,16 \
           --loadgen wrk "${job[@]}" "${triton[@]}" ${LOOPS:+--worker-http-loops "$LOOPS"} --out "$OUT" ;;
  job)   TMPDIR=$scratch python3 scripts/gpu_bench.py --bare-threads 4 --systems "" --batches 256 "${job[@]}" \
           --shm-pinning "${2:-background}" --out "$OUT" ;;
  binary) python3 scripts/gpu_bench.py --bare-threads 4 --systems fleet-http-binary --batches 256 --levels 256:8,16 \
           --loadgen wrk --profile ${2:+--gil-switch-ms "$2"} ${LOOPS:+--worker-http-loops "$LOOPS"} --out "$OUT" ;;
  cnn)   CUDA_VISIBLE_DEVICES= timeout 300 python3 scripts/bench.py --phases bare,fleet-http --models cnn-small \
           --pin 0-7:8-15 --loadgen wrk --out "$OUT" --no-chart ;;
  tests) # the tests write a JSON each: one archive of them comes back (a device call returns at most 8 files)
         rc=0; mkdir -p /tmp/gpu-tests; OUT=/tmp/gpu-tests python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider || rc=$?
         tar czf "$OUT/gpu-tests.tgz" -C /tmp/gpu-tests . ; exit $rc ;;
  all)   # every Done-when item from one call on one machine (~7 min): full, cnn and tests, each bounded,
         # their logs and results in one archive; the lines that carry the numbers on stdout
         rc=0; steps=/tmp/issue19; rm -rf "$steps"
         for step in full:300 cnn:120 tests:170; do
           mkdir -p "$steps/${step%%:*}"
           OUT="$steps/${step%%:*}" timeout "${step##*:}" bash "$0" "${step%%:*}" > "$steps/${step%%:*}.log" 2>&1 || rc=$?
           echo "== ${step%%:*}: exit $rc"; rc=0
         done
         grep -h "^| \|^time:\|^parts\|^timeline\|^shared memory\|^the model\|issue 19\|vs bare\|passed\|failed" \
           "$steps"/*.log | cut -c1-400 || true
         tar czf "$OUT/issue19.tgz" -C "$steps" . ;;
  *)     sed -n 2,21p "$0"; exit 2 ;;
esac
