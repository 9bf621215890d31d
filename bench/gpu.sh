#!/usr/bin/env bash
# GPU figures: `bash bench/gpu.sh DATA OUT [train|serve|all]` on a CUDA machine.
#
# DATA holds flowers12/ and sms_spam/ (../shared/data). `train`: fine-tunes both with AMP on CUDA and exports them with fp16 validated on
# CUDA; `serve`: bench/serve.py with the CUDA provider (TensorRT where its libraries load) on
# both artifacts. Everything lands in OUT; figures go to bench/RESULTS.md by hand.
set -euo pipefail
data=$1 out=$2 step=${3:-all}
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 BENTOML_DO_NOT_TRACK=true BENTOML_HOME=$out/bentoml PYTHONUNBUFFERED=1
mkdir -p "$out"
timed() { local t0=$SECONDS; "$@"; echo "timing: $((SECONDS - t0)) s for: $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" - <<'EOF'
import onnxruntime as ort, torch
from service.runtime import usable_providers
print("torch", torch.__version__, torch.cuda.get_device_name(0))
print("onnxruntime", ort.__version__, "available:", ort.get_available_providers())
print("usable (loadable libraries):", usable_providers())
EOF

if [[ $step == train || $step == all ]]; then
    for strategy in feature-extraction full; do
        timed "$py" -m finetune "$data/flowers12" --backbone efficientnet_lite0 \
            --strategy $strategy --out "$out/runs/flowers-$strategy" --overwrite
    done
    timed "$py" -m finetune "$data/sms_spam/SMSSpamCollection" --backbone minilm \
        --strategy full --epochs 2 --max-length 64 --backbone-lr 5e-5 \
        --out "$out/runs/sms_full" --overwrite
    timed "$py" -m export "$out/runs/flowers-full" --out "$out/art" --name flowers --int8 --fp16
    timed "$py" -m export "$out/runs/sms_full" --out "$out/art" --name sms --int8 --fp16
fi

if [[ $step == serve || $step == all ]]; then
    "$py" bench/serve.py --run "$out/runs/sms_full" --artifact "$out/art/sms/v1" \
        --seconds 10 --clients 1,64
    # One worker is the GPU default; four share the GPU and split the per-request Python work.
    TUNESERVE_WORKERS=4 "$py" bench/serve.py --run "$out/runs/sms_full" \
        --artifact "$out/art/sms/v1" --seconds 10 --clients 64 --no-peer
    "$py" bench/serve.py --run "$out/runs/flowers-full" --artifact "$out/art/flowers/v1" \
        --seconds 10 --clients 1,64
fi
