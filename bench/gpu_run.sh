#!/usr/bin/env bash
# The one GPU run of bench/gpu_check.py, sized for a short lease on one GPU (about 7 minutes in all).
#
#   bash bench/gpu_run.sh prepare   # here, with the package index: .whl/ and .gpu_data/ (both ignored), ~40 MB
#   bash bench/gpu_run.sh           # on the GPU machine (python3 3.12 with torch, no network): results to $OUT
#   bash bench/gpu_run.sh smoke     # on a CPU, with .venv/bin/python: the same sections at --smoke sizes
#
# The GPU machine's python3 has torch, torchvision, timm, accelerate, pyarrow, pandas, ... but not datasets,
# evaluate, dill, multiprocess or deepspeed, and transformers/huggingface_hub too old for this project; `prepare`
# downloads those wheels (one version each; see WHEELS), builds DeepSpeed's pure-Python wheel (DS_BUILD_OPS=0: no
# compiled ops; ZeRO-2 with the Trainer's torch optimizer needs none) and writes a 4096/1024-image Fashion-MNIST
# subset in the Debian package's idx format (the launchers section trains on it; the machine has no
# /usr/share/datasets/fashion-mnist). The device run installs the wheels and the project into /tmp/site, then runs
# the sections in priority order, each under its own time cap, while the total budget lasts:
#   launchers   (issue 18) FSDP2, DeepSpeed ZeRO-2, DDP with a teacher, killed and resumed  cap LAUNCHERS_S=230
#   device_feed (issue 19) --augment_on device vs workers, --feed_size short                cap FEED_S=170
#   correctness, training (the default sections) with what is left, if at least 100 s        TOTAL_S=420
# Each section writes $OUT/<section>.json and .md when it ends; $OUT/run.log has everything printed, so a
# section cut off by its cap still leaves its printed rows. Budgets are environment variables (seconds).
set -u
MODE=${1:-gpu}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

WHEELS=(
    transformers==5.25.0 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
    huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 h11==0.16.0 kernels==0.19.1
    tomlkit==0.15.3 click==8.5.1 hf_xet==1.8.0 idna==3.20 anyio==4.16.0 fsspec==2026.9.0 regex==2026.11.19
    tqdm==4.70.1 filelock==4.3.2 accelerate==1.16.0 timm==1.0.31 safetensors==0.8.0 tokenizers==0.23.3
    hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
    typing_extensions==4.16.0
)
DEEPSPEED=deepspeed==0.19.8
FASHION_MNIST=/usr/share/datasets/fashion-mnist

if [ "$MODE" = prepare ]; then
    set -e
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
    grep -qx '/.gpu_data/' .git/info/exclude 2>/dev/null || echo /.gpu_data/ >>.git/info/exclude
    rm -rf .whl .gpu_data && mkdir -p .whl .gpu_data/fashion-mnist
    platforms=()
    for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
        manylinux_2_17 manylinux2014 manylinux1; do platforms+=(--platform "${tag}_x86_64"); done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
    # DeepSpeed is an sdist only; with DS_BUILD_OPS=0 its wheel is pure Python (py3-none-any).
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$DEEPSPEED"
    DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation --no-index -w .whl "$tmp"/deepspeed-*.tar.gz
    rm -rf "$tmp"
    python3 - "$FASHION_MNIST" .gpu_data/fashion-mnist <<'EOF'
import gzip, sys
from pathlib import Path
source, target = Path(sys.argv[1]), Path(sys.argv[2])
for prefix, count in (("train", 4096), ("t10k", 1024)):
    for kind, item in (("images-idx3", 28 * 28), ("labels-idx1", 1)):
        raw = gzip.open(source / f"{prefix}-{kind}-ubyte.gz").read()
        header = 4 + 4 * (raw[3])  # magic, then one uint32 per dimension
        head = bytearray(raw[:header])
        head[4:8] = count.to_bytes(4, "big")
        (target / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(bytes(head) + raw[header : header + count * item]))
EOF
    ls .whl | wc -l
    du -cb .whl .gpu_data | tail -1
    exit 0
fi

if [ "$MODE" = smoke ]; then
    PY=${PY:-.venv/bin/python}
    OUT=${OUT:-/tmp/gpu_run_smoke}
    SMOKE=(--smoke)
else
    PY=python3
    OUT=${OUT:?OUT must name the folder that comes back}
    SMOKE=()
fi
TOTAL_S=${TOTAL_S:-420}
LAUNCHERS_S=${LAUNCHERS_S:-230}
FEED_S=${FEED_S:-170}
WORK=/tmp/gpu_run
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
TEE=$!
START=$SECONDS
left() { echo $((TOTAL_S - (SECONDS - START))); }
stamp() { echo "=== [$((SECONDS - START)) s] $*"; }

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$MODE" != smoke ]; then
    stamp "install"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 2; }
    # The project, as pip installs it (package-dir mapping, package data); symbolic links if that fails.
    mkdir -p "$WORK/src" && cp -r pyproject.toml README.md training modeling_deit_distill model_cards "$WORK/src/"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site "$WORK/src"; then
        echo "project install failed; linking its folders instead"
        mkdir -p /tmp/site/deit_distill
        for folder in training modeling_deit_distill model_cards; do ln -sfn "$ROOT/$folder" "/tmp/site/deit_distill/$folder"; done
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if [ ! -f "$FASHION_MNIST/train-images-idx3-ubyte.gz" ]; then
        mkdir -p "$FASHION_MNIST" && cp .gpu_data/fashion-mnist/*.gz "$FASHION_MNIST/" \
            || echo "WARNING: could not place Fashion-MNIST in $FASHION_MNIST: the launchers section will fail"
    fi
    stamp "machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    echo "cpus $(nproc)"; df -h /dev/shm /tmp | tail -n +2; free -g | head -2
fi
stamp "versions"
timeout 90 "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "torchvision", "transformers", "accelerate", "datasets", "evaluate", "huggingface_hub",
             "timm", "tokenizers", "safetensors", "pyarrow", "pandas", "numpy", "deepspeed", "deit_distill.training"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
    except Exception as error:  # report, do not stop: the sections say what they need
        print(f"{name} NOT IMPORTABLE: {type(error).__name__}: {error}")
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
if [ "$MODE" != smoke ]; then "$PY" -m pip check 2>&1 | head -20; fi

# One gpu_check.py run per section, under `timeout`; copies its results into $OUT; ends what it left running
# (the launchers start `accelerate launch` in sessions of their own, which `timeout` does not reach).
section() {
    local name=$1 cap=$2
    shift 2
    local budget=$(($(left) - 5))
    [ "$budget" -lt "$cap" ] && cap=$budget
    if [ "$cap" -lt 30 ]; then stamp "$name: not run, ${cap} s left"; return; fi
    stamp "$name: cap $cap s"
    timeout -k 10 "$cap" "$PY" bench/gpu_check.py ${SMOKE[@]+"${SMOKE[@]}"} --out "$WORK/$name" "$@"
    local rc=$?
    stamp "$name: rc $rc$([ $rc = 124 ] && echo ' (cut off at its cap)')"
    for pid in $(pgrep -f "$WORK/$name/" || true); do kill -9 "$pid" 2>/dev/null; done
    cp "$WORK/$name/results.json" "$OUT/$name.json" 2>/dev/null
    cp "$WORK/$name/results.md" "$OUT/$name.md" 2>/dev/null
    if [ $rc != 0 ]; then
        for log in "$WORK/$name"/*/*.log; do
            [ -f "$log" ] && { echo "--- tail of $log"; tail -n 15 "$log"; }
        done
    fi
}
section launchers "$LAUNCHERS_S" --sections launchers --launchers fsdp2 deepspeed_zero2 ddp --launcher_timeout 90
section device_feed "$FEED_S" --sections device_feed --feed_size short
if [ "$MODE" != smoke ] && [ "$(left)" -ge 100 ]; then
    section default "$(left)" --sections correctness training
fi
stamp "done"
exec >&- 2>&-
wait "$TEE" 2>/dev/null # run.log complete before the machine hands $OUT back
