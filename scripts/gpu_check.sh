#!/usr/bin/env bash
# The GPU check: proves stable-cnn's CUDA path on a machine with one NVIDIA GPU, in at
# most 8 minutes, and writes OUTDIR/summary.md (plus the logs it is made from). Most
# important evidence first:
#
#   1. the README's default command, `stable-cnn-train` (trainer.device=auto), on CUDA
#   2. the `cuda` tests (tests/test_cuda.py: real runs in fp16/bf16/auto, exact resume
#      with deterministic kernels, channels_last + compile, the captured step and its
#      fallback, no host read or sync per step, global BatchNorm without syncs, eval,
#      Muon + mixup/cutmix + translate TTA)
#   3. host syncs per step counted with torch.cuda.set_sync_debug_mode
#      (scripts/host_syncs.py: eager fp16/bf16, compiled, captured in a CUDA graph)
#   4. torchrun with one process and model.sync_batchnorm=true (NCCL, DDP's path)
#   5. the fp16 path on real data (amp=fp16: GradScaler, skipped steps)
#   6. scripts/benchmark.py: SmallCNN width 64 on CIFAR-10-shaped synthetic data, batch
#      128 and 512, fp16 and bf16, the step in a CUDA graph, torch.compile (512)
#   7. experiment=fashion_mnist_speedrun (93% in 45 s on a 2-core CPU; optimizer=muon)
#   8. scripts/image_folder_benchmark.py: a folder of 50,000 JPEGs made from Fashion-MNIST,
#      data=image_folder with data.cache=memory, disk and none beside a plain ImageFolder +
#      DataLoader loop on the GPU (issue 32's GPU point: does the device wait on the host?)
#   9. experiment=fashion_mnist_resnet18 for 2 epochs: torchvision's ResNet-18 (model=resnet)
#      on the GPU, its images/s
#  10. experiment=fashion_mnist_gpu (95.36% in 30 epochs on a CPU), as far as time allows
#
# Usage: bash scripts/gpu_check.sh OUTDIR [--dry-run]
#   --dry-run: everything but the CUDA parts, tiny and on the CPU (CI runs it this way).
#
# On this project's lent GPU machine (torch there, but no hydra-core/omegaconf and no
# network), through the `device` tool:
#   here, once:   bash scripts/gpu_bundle.sh          # wheels + Fashion-MNIST into .gpu/
#   device run:   command "bash scripts/gpu_check.sh $OUT"  carry [".gpu"]  timeout_s 540
# then copy the figures from summary.md into docs/benchmarks.md with the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR [--dry-run]}
dry=false
[ "${2:-}" = "--dry-run" ] && dry=true
mkdir -p "$out"
out=$(cd "$out" && pwd)
# What comes back from the device tool is at most 8 files: summary.md, logs.tar.gz (every
# step's log) and time_to_accuracy.json. Everything else lives in a scratch folder.
work=$(mktemp -d /tmp/stable-cnn-gpu-check.XXXXXX)
logs=$work/logs
mkdir -p "$logs"
log="$logs/gpu_check.log"
summary="$out/summary.md"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
export PYTHONUNBUFFERED=1

# Hydra and OmegaConf from the carried wheels where they are missing; stable_cnn from
# this checkout (no install step: the machine has no network to build with).
if ! "$py" -c "import hydra, omegaconf" 2>/dev/null; then
    if [ -d .gpu/wheels ]; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" \
            .gpu/wheels/*.whl >>"$log" 2>&1
        export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu_check: hydra-core is missing and there is no .gpu/wheels: run scripts/gpu_bundle.sh" >&2
        exit 2
    fi
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
system_dir=/usr/share/datasets/fashion-mnist
[ -d .gpu/fashion-mnist ] && system_dir=$repo/.gpu/fashion-mnist
data=("data.root=$work/data" "data.system_dir=$system_dir" trainer.progress_bar=false)
runs=$work/runs

failed=0
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))  # the whole check: under 8 minutes
step() {  # step NAME TIMEOUT_S COMMAND...: run within the deadline, log, record status and time
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "| $name | skipped: out of time | 0 s |" >>"$work/steps.md"
        failed=1
        return 0
    fi
    local started=$SECONDS
    echo "== $name (limit ${limit} s): $*" >>"$log"
    timeout "$limit" "$@" >>"$logs/$name.log" 2>&1
    local status=$?
    local shown="exit $status"
    [ $status -eq 0 ] && shown=ok
    [ $status -eq 124 ] && shown="timed out after ${limit} s"
    if [ $status -eq 124 ] && [ "${may_time_out:-}" = true ]; then
        shown="stopped at the deadline, as planned"
    elif [ $status -ne 0 ]; then
        failed=1
    fi
    echo "| $name | $shown | $((SECONDS - started)) s |" >>"$work/steps.md"
    return 0
}
: >"$work/steps.md"

run_lines() {  # run_lines LOG: the run's own lines (device, precision, epochs, test), no prefix
    grep -E "device |precision |- model |epoch [0-9]+/|test of best|error" "$1" 2>/dev/null \
        | sed 's/^.*\] - //' | grep -v "^Traceback" | tail -n 12
}

write_summary() {  # also on an early exit: whatever ran is in summary.md
    {
        echo "# stable-cnn GPU check ($(date -u +%Y-%m-%d), $($dry && echo dry run on the CPU || echo "$device"))"
        echo
        echo '```'
        cat "$logs/facts.log" 2>/dev/null
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        echo '```'
        echo
        echo "| step | status | time |"
        echo "|---|---|---:|"
        cat "$work/steps.md"
        echo
        echo "## the default command (trainer.device=auto)"
        echo
        echo '```'
        run_lines "$logs/default_command.log"
        echo '```'
        echo
        echo "## cuda tests"
        echo
        echo '```'
        grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$logs/cuda_tests.log" 2>/dev/null | tail -n 20
        echo '```'
        echo
        echo "## host syncs per training step"
        echo
        grep -E '^(\||device )' "$logs/host_syncs.log" 2>/dev/null
        echo
        echo "## torchrun, one process, model.sync_batchnorm=true"
        echo
        echo '```'
        run_lines "$logs/torchrun_sync_batchnorm.log"
        echo '```'
        echo
        echo "## amp=fp16"
        echo
        echo '```'
        run_lines "$logs/fp16.log"
        echo '```'
        echo
        echo "## ${resnet[*]}"
        echo
        echo '```'
        run_lines "$logs/resnet18.log"
        echo '```'
        for name in "${benchmarks[@]}"; do
            echo
            echo "## $name"
            echo
            if grep -q '^| path' "$logs/$name.log" 2>/dev/null; then
                grep -E '^(\||CPU|SmallCNN|machine)' "$logs/$name.log"
            else  # cut short: the rows it finished, as it printed them
                echo '```'
                grep -E '^  ' "$logs/$name.log" 2>/dev/null
                echo '```'
            fi
        done
        echo
        echo "## time to accuracy: ${preset[*]}"
        echo
        "$py" - "$runs/preset" <<'PY' 2>/dev/null || echo "no result: see time_to_accuracy.log"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
if (run / "results.json").is_file():
    r = json.loads((run / "results.json").read_text())
    print(f"test accuracy {r['test_acc']:.2f}% (best val {r['best_val_acc']:.2f}%, epoch "
          f"{r['best_epoch']}), {r['epochs']} epochs, {r['wall_s']:.1f} s in train() on "
          f"{r['device']}, {r['precision']}")
else:  # stopped by the check's deadline: how far it got
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = epochs[-1]
    acc = last.get("val_acc_ema", last["val_acc"])
    print(f"cut short by the check's deadline after epoch {last['epoch']}: val accuracy "
          f"{acc:.2f}%, {sum(e['epoch_s'] for e in epochs):.1f} s of training "
          f"({last['train_img_s']:,.0f} img/s in the last epoch)")
PY
    } >"$summary"
    cp "$runs/preset/results.json" "$out/time_to_accuracy.json" 2>/dev/null \
        || cp "$runs/preset/metrics.jsonl" "$out/time_to_accuracy.jsonl" 2>/dev/null
    tar -czf "$out/logs.tar.gz" -C "$work" logs 2>/dev/null
    rm -rf "$work"
}
benchmarks=()
trap write_summary EXIT

if $dry; then
    device=cpu
    on=(trainer.device=cpu)
    default=(experiment=smoke "${on[@]}" data.limit_train=256 data.limit_test=64
             data.val_size=64 trainer.epochs=1)
    small=("${default[@]}")
    preset=("${default[@]}")
    resnet=(experiment=fashion_mnist_resnet18 "${on[@]}" data.limit_train=64 data.limit_test=32
            data.val_size=32 data.batch_size=32 trainer.epochs=1)
    syncs=(--device cpu --paths eager --precisions bf16)
    bench=(--device cpu --width 8 --steps 2 --warmup 1 --quick)
    sizes=(32)  # one size is enough to know the step works
    graph=()
    folder_bench=(--images 400 --epochs 1 --caches disk)  # one stable-cnn run, one plain loop
else
    device=cuda
    on=()
    default=()  # the README's command as it is: trainer.device=auto finds the GPU
    small=(experiment=smoke)
    preset=(experiment=fashion_mnist_gpu)
    resnet=(experiment=fashion_mnist_resnet18 trainer.epochs=2)
    syncs=(--device cuda)
    bench=(--device cuda --width 64 --steps 200 --warmup 10 --quick)
    sizes=(128 512)
    graph=(--cuda-graph)
    folder_bench=(--images 50000 --epochs 2 --caches memory,disk,none)
fi

step facts 30 "$py" -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('GPU', p.name, f'| compute capability {p.major}.{p.minor} | {p.total_memory / 2**30:.0f} GiB | {p.multi_processor_count} SMs')
else:
    print('no CUDA GPU: dry run on the CPU')
"
step default_command 120 "$py" -m stable_cnn.train ${default[@]+"${default[@]}"} "${data[@]}" \
    "hydra.run.dir=$runs/default"
step cuda_tests 180 "$py" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -rs
step host_syncs 90 "$py" scripts/host_syncs.py "${syncs[@]}"
# torchrun with one process: the DDP path of many (process group, NCCL on the GPU, the
# sharded evaluation's all-reduce, the global BatchNorm), on the one GPU there is
step torchrun_sync_batchnorm 90 "$py" -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m stable_cnn.train "${small[@]}" model.sync_batchnorm=true "${data[@]}" \
    "hydra.run.dir=$runs/torchrun"
step fp16 60 "$py" -m stable_cnn.train "${small[@]}" amp=fp16 "${data[@]}" "hydra.run.dir=$runs/fp16"
for size in "${sizes[@]}"; do
    benchmarks+=("benchmark_b$size")
    step "benchmark_b$size" 60 "$py" scripts/benchmark.py --dataset cifar10-synthetic \
        --precisions fp16,bf16 --batch-size "$size" "${bench[@]}" ${graph[@]+"${graph[@]}"}
done
if ! $dry; then  # torch.compile: minutes of compiling on a CPU, so only on the GPU
    benchmarks+=("benchmark_b512_compile")
    step benchmark_b512_compile 90 "$py" scripts/benchmark.py --dataset cifar10-synthetic \
        --precisions bf16 --batch-size 512 --compile "${bench[@]}"
fi
if ! $dry; then  # the CPU's speedrun on the GPU (Muon's Newton-Schulz on the device)
    step speedrun 90 "$py" -m stable_cnn.train experiment=fashion_mnist_speedrun "${data[@]}" \
        "hydra.run.dir=$runs/speedrun"
fi
benchmarks+=("image_folder")
step image_folder 120 "$py" scripts/image_folder_benchmark.py "${folder_bench[@]}" \
    --out "$work/folder" --data-root "$work/data" --system-dir "$system_dir"
step resnet18 75 "$py" -m stable_cnn.train "${resnet[@]}" "${data[@]}" "hydra.run.dir=$runs/resnet18"
# the preset last, with whatever time is left: the summary says how far it got
may_time_out=true step time_to_accuracy 600 "$py" -m stable_cnn.train "${preset[@]}" "${data[@]}" \
    "hydra.run.dir=$runs/preset"

trap - EXIT
write_summary
cat "$summary"
exit $failed
