#!/usr/bin/env bash
# Pack PyTriton's environment for the offline GPU host (CPython 3.12, x86_64, glibc >= 2.35), which
# receives at most ~64 MiB per transfer: the GPU bench's Triton part (benchmarks/gpu_triton.py).
#
#   bash scripts/pack_triton_env.sh            (from the checkout's root; network to PyPI)
#
# nvidia-pytriton 0.7.0 pins numpy < 2 and tritonclient[grpc] pins protobuf < 7, while the fleet's
# wheels in /tmp/site bring numpy 2 and protobuf 7: so PyTriton gets an environment of its own, a venv
# (/tmp/triton-venv, no pip, no system site-packages) whose site-packages holds everything pip resolves
# for PyTriton, put BEFORE /tmp/site on the Triton process's PYTHONPATH only (numpy 1.26 wins there);
# onnxruntime-gpu 1.31.1 (numpy >= 1.21.6, checked below where its wheel is cached) comes from /tmp/site.
# A venv and not a bare --target directory: Triton's Python backend stub runs an isolated interpreter
# that ignores PYTHONPATH and finds numpy, zmq and pytriton only in the venv on its PATH.
#
# Writes parts of at most PART_MB (default 60) megabytes to .wheelparts/t0 .. .wheelparts/tN (git
# ignores /.wheelparts/ through .git/info/exclude); wheels larger than a part are cut into pieces.
# Touches nothing else under .wheelparts. On the host, one transfer per part, each followed by
#   bash .wheelparts/tK/stash.sh          # copies part K into /tmp/tritonparts
# and after the last one
#   bash .wheelparts/tN/install.sh        # joins pieces, makes /tmp/triton-venv, installs into it
# (/tmp must survive between transfers: the same running host). Then
#   PYTHONPATH=/tmp/site:. python3 scripts/gpu_bench.py ... --triton-python /tmp/triton-venv/bin/python3 \
#       --triton-pythonpath /tmp/triton-venv/lib/python3.12/site-packages:/tmp/site
set -euo pipefail
PART_MB=${PART_MB:-60}
ROOT="$(pwd)"
OUT="$ROOT/.wheelparts"
CACHE="${TRITON_WHEEL_CACHE:-/tmp/wheelcache-triton-py312}"
FLEET_CACHE="${WHEEL_CACHE:-/tmp/wheelcache-py312}"  # where pack-wheels.sh left onnxruntime-gpu, if it did
REQS=("nvidia-pytriton==0.7.0" "numpy<2" "protobuf<7")
[ -d "$ROOT/.git" ] || [ -f "$ROOT/.git" ] || { echo "run from the checkout's root" >&2; exit 2; }
mkdir -p "$CACHE"

echo "downloading: ${REQS[*]} (cp312, manylinux x86_64 up to 2_35)" >&2
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
  --abi none --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 -d "$CACHE" "${REQS[@]}" >&2

# Only what this resolution asked for (the cache may hold other versions from earlier runs): resolve
# again from the cache alone into an empty directory, and take what lands there.
PICKED="$(mktemp -d)"
trap 'rm -rf "$PICKED"' EXIT
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
  --abi none --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 --no-index --find-links "$CACHE" -d "$PICKED" "${REQS[@]}" 2>/dev/null
mapfile -t wheels < <(cd "$PICKED" && ls *.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "no wheels resolved" >&2; exit 1; }

ort=$(ls "$FLEET_CACHE"/onnxruntime_gpu-1.31.1-*.whl 2>/dev/null | head -1 || true)
if [ -n "$ort" ]; then
  need=$(unzip -p "$ort" 'onnxruntime_gpu-1.31.1.dist-info/METADATA' | sed -n 's/^Requires-Dist: numpy//p')
  echo "onnxruntime-gpu 1.31.1 asks numpy$need: numpy 1.26 in the Triton venv satisfies it" >&2
fi

mkdir -p "$OUT"
rm -rf "$OUT"/t[0-9]*
python3 - "$PICKED" "$OUT" "$PART_MB" "${wheels[@]}" <<'PY'
import os, sys
cache, out, part_mb, *wheels = sys.argv[1:]
limit = int(part_mb) * 1_000_000
for w in wheels:  # every wheel must run on CPython 3.12 x86_64
    tags = w[:-4].split("-")[-3:]
    assert tags[0] in ("py3", "cp312", "py2.py3") or tags[0].startswith("cp3"), w
    assert tags[1] in ("none", "cp312", "abi3"), w
    assert tags[2] == "any" or "x86_64" in tags[2], w
pieces = []  # (size, source, offset, name)
for w in sorted(set(wheels)):
    size = os.path.getsize(os.path.join(cache, w))
    if size <= limit:
        pieces.append((size, w, 0, w))
    else:
        for i, off in enumerate(range(0, size, limit)):
            pieces.append((min(limit, size - off), w, off, f"{w}.piece{i:02d}"))
parts = []  # first fit, largest first
for p in sorted(pieces, reverse=True):
    for part in parts:
        if sum(x[0] for x in part) + p[0] <= limit:
            part.append(p)
            break
    else:
        parts.append([p])
n = len(parts)
for k, part in enumerate(parts):
    d = os.path.join(out, f"t{k}")
    os.makedirs(d)
    for size, src, off, name in part:
        with open(os.path.join(cache, src), "rb") as f, open(os.path.join(d, name), "wb") as g:
            f.seek(off)
            g.write(f.read(size))
    with open(os.path.join(d, "stash.sh"), "w") as f:
        f.write('set -e; mkdir -p /tmp/tritonparts; d="$(dirname "${BASH_SOURCE[0]}")"; '
                'cp "$d"/*.whl* /tmp/tritonparts/; '
                f'echo "triton part {k} of {n - 1} stashed: $(ls /tmp/tritonparts | wc -l) files in /tmp/tritonparts"\n')
    print(f"t{k}: {len(part)} file(s), {sum(x[0] for x in part) / 1e6:.1f} MB", file=sys.stderr)
with open(os.path.join(out, f"t{n - 1}", "install.sh"), "w") as f:
    f.write(f"""# on the GPU host, after every part t0..t{n - 1} was stashed: bash .wheelparts/t{n - 1}/install.sh
set -e
cd /tmp/tritonparts
for first in *.piece00; do
  [ -e "$first" ] || continue
  whl="${{first%.piece00}}"; cat "$whl".piece* > "$whl"; rm -f "$whl".piece*
done
n=$(ls *.whl | wc -l)
[ "$n" -eq {len(set(wheels))} ] || {{ echo "expected {len(set(wheels))} wheels in /tmp/tritonparts, found $n: stash every part t0..t{n - 1}" >&2; exit 1; }}
# A venv, not a bare --target directory: Triton's Python backend stub starts an isolated interpreter
# (PYTHONPATH ignored) that finds numpy, zmq and pytriton only in the site-packages of the venv whose
# bin/ is on its PATH; and PyTriton finds its libraries (nvidia_pytriton.libs) only from a site dir.
if [ ! -x /tmp/triton-venv/bin/python3 ]; then
  python3 -m venv --without-pip /tmp/triton-venv || PYTHONPATH=/tmp/site python3 -m virtualenv --no-pip --no-setuptools --no-wheel /tmp/triton-venv
fi
site=$(/tmp/triton-venv/bin/python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" *.whl
echo "installed $n wheels into $site"
PYTHONPATH="$site":/tmp/site /tmp/triton-venv/bin/python3 -c 'import numpy, pytriton, tritonclient.grpc, tritonclient.http, onnxruntime as o; print("triton env: numpy", numpy.__version__, "pytriton", pytriton.__version__, "onnxruntime", o.__version__, o.get_available_providers())' || echo "WARNING: PyTriton's environment does not import (see above)" >&2
v=$(python3 -c 'import sys; print(f"{{sys.version_info[0]}}.{{sys.version_info[1]}}")')
lib=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
if [ -e "$lib/libpython$v.so.1.0" ] || ldconfig -p 2>/dev/null | grep -q "libpython$v.so.1.0"; then
  echo "libpython$v.so.1.0: found (Triton's Python backend stub needs it)"
else
  echo "WARNING: libpython$v.so.1.0 is not on this host: Triton's Python backend stub cannot start (apt-get install libpython$v, on Ubuntu 24.04 libpython${{v}}t64)" >&2
fi
df -h /dev/shm | tail -1 | awk '{{print "/dev/shm: " $2 " total, " $4 " free (PyTriton passes tensors through it)"}}'
echo "gpu_bench: --triton-python /tmp/triton-venv/bin/python3 --triton-pythonpath $site:/tmp/site"
""")
print(f"{n} part(s), {sum(x[0] for x in pieces) / 1e6:.1f} MB in all, {len(set(wheels))} wheels", file=sys.stderr)
PY
ls -d "$OUT"/t* >&2
