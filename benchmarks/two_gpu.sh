#!/usr/bin/env bash
# Training on two GPUs of one host (issue 3): FSDP2 over NCCL against one GPU, an exact resume, then the
# throughput benchmark on two ranks.
#
#   OUT=bench-out PYTHONPATH=src bash benchmarks/two_gpu.sh          # about 7 minutes on 2 H200s
#   DEVICE=cpu BENCH="--tiny --device cpu" bash benchmarks/two_gpu.sh   # a smoke test of the script (gloo)
#
# 1. rat-small on the embedded corpus, 30 steps of a 16 x 256 global batch in fp32 (so that only the
#    order of the reductions differs): FSDP2 on 2 ranks (micro-batch 8) and one process (micro-batch 16).
# 2. The 2-rank run again from its step-15 checkpoint (torch.distributed.checkpoint, written by both ranks):
#    steps 16-30 must repeat the uninterrupted run's losses.
# 3. `ratlm.bench.train --distributed`: tokens/s, MFU and peak memory of the 1.3B presets on 2 ranks.
# Everything lands in $OUT/two-gpu; compare.json holds the loss comparison.
set -u
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
W=${OUT:-bench-out}/two-gpu
mkdir -p "$W"
run=("--preset" "rat-small" "--max-steps" "30" "--batch-size" "16" "--seq-len" "256" "--eval-every" "0"
    "--final-eval-tokens" "20000" "--sample-tokens" "0" "--precision" "fp32" "--device" "$dev" "--seed" "0")
two=("$py" -m torch.distributed.run --standalone --nproc_per_node=2 -m ratlm train)
status=0
"${two[@]}" "${run[@]}" --parallel fsdp --micro-batch 8 --ckpt-every 15 --out "$W/fsdp2" >"$W/fsdp2.log" 2>&1 || status=1
"$py" -m ratlm train "${run[@]}" --parallel none --micro-batch 16 --out "$W/one" >"$W/one.log" 2>&1 || status=1
mkdir -p "$W/resumed/checkpoints"
cp -r "$W/fsdp2/checkpoints/step_00000015" "$W/resumed/checkpoints/" || status=1
"${two[@]}" "${run[@]}" --parallel fsdp --micro-batch 8 --out "$W/resumed" >"$W/resumed.log" 2>&1 || status=1
"$py" - "$W" <<'EOF' || status=1
import json, sys
from pathlib import Path

w = Path(sys.argv[1])
def losses(name):
    return [json.loads(line)["loss"] for line in (w / name / "train_log.jsonl").read_text().splitlines()]

fsdp, one, resumed = losses("fsdp2"), losses("one"), losses("resumed")
rel = lambda a, b: max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
out = {
    "steps": len(fsdp),
    "fsdp2_vs_one_max_rel": rel(fsdp, one),
    "resumed_vs_fsdp2_max_rel": rel(resumed, fsdp[15:]),
    "resumed_equal": resumed == fsdp[15:],
    "world_size": json.loads((w / "fsdp2" / "train_metrics.json").read_text())["world_size"],
    "final_loss": {"fsdp2": fsdp[-1], "one": one[-1], "resumed": resumed[-1]},
}
(w / "compare.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out))
sys.exit(0 if out["fsdp2_vs_one_max_rel"] < 1e-4 and out["resumed_vs_fsdp2_max_rel"] < 1e-5 else 1)
EOF
# shellcheck disable=SC2086  # BENCH holds several arguments
OUT=$W "${two[@]:0:5}" -m ratlm.bench.train --distributed ${BENCH:---budget-s 180 --no-compile} >"$W/bench.log" 2>&1 || status=1
tail -n 15 "$W/bench.log"
exit $status
