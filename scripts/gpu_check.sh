#!/usr/bin/env bash
# The GPU check: proves stable-cnn's CUDA path on a machine with one NVIDIA GPU, in at
# most 8.5 minutes, and writes OUTDIR/summary.md (plus the logs it is made from).
#
#   1. the `cuda` tests (tests/test_cuda.py: real runs in fp16/bf16, exact resume with
#      deterministic kernels, channels_last + compile, no host read or sync per step)
#   2. time to accuracy on real Fashion-MNIST: experiment=fashion_mnist_gpu (95.36% in 30
#      epochs on a CPU; the headline, so it runs before the benchmarks)
#   3. torchrun with one process: the distributed path (NCCL) on the one GPU
#   4. scripts/benchmark.py: SmallCNN width 64 on CIFAR-10-shaped synthetic data, batch
#      128 and 512, fp16 and bf16, torch.compile off and on (512), the step in a CUDA
#      graph (bf16; fp16 needs the host and falls back), bare ceiling beside each
#
# Usage: bash scripts/gpu_check.sh OUTDIR [--dry-run]
#   --dry-run: everything but the CUDA parts, tiny and on the CPU (CI runs it this way).
#
# On this project's lent GPU machine (torch there, but no hydra-core/omegaconf and no
# network), through the `device` tool:
#   here, once:   bash scripts/gpu_bundle.sh          # wheels + Fashion-MNIST into .gpu/
#   device run:   command "bash scripts/gpu_check.sh $OUT"  carry [".gpu"]  timeout_s 560
# then copy the figures from summary.md into docs/benchmarks.md with the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR [--dry-run]}
dry=false
[ "${2:-}" = "--dry-run" ] && dry=true
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/gpu_check.log"
summary="$out/summary.md"
: >"$log"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
export PYTHONUNBUFFERED=1

# Hydra and OmegaConf from the carried wheels where they are missing; stable_cnn from
# this checkout (no install step: the machine has no network to build with).
if ! "$py" -c "import hydra, omegaconf" 2>/dev/null; then
    if [ -d .gpu/wheels ]; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/stable-cnn-site \
            .gpu/wheels/*.whl >>"$log" 2>&1
        export PYTHONPATH=/tmp/stable-cnn-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu_check: hydra-core is missing and there is no .gpu/wheels: run scripts/gpu_bundle.sh" >&2
        exit 2
    fi
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
system_dir=/usr/share/datasets/fashion-mnist
[ -d .gpu/fashion-mnist ] && system_dir=$repo/.gpu/fashion-mnist
data_root=$(mktemp -d /tmp/stable-cnn-data.XXXXXX)
runs=$(mktemp -d /tmp/stable-cnn-runs.XXXXXX)

failed=0
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-500}))  # the whole check: 8.3 minutes at most
step() {  # step NAME TIMEOUT_S COMMAND...: run within the deadline, log, record status and time
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "| $name | skipped: out of time | 0 s |" >>"$out/steps.md"
        failed=1
        return 0
    fi
    local started=$SECONDS
    echo "== $name (limit ${limit} s): $*" >>"$log"
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    local status=$?
    [ $status -ne 0 ] && failed=1
    local shown="exit $status"
    [ $status -eq 0 ] && shown=ok
    [ $status -eq 124 ] && shown="timed out after ${limit} s"
    echo "| $name | $shown | $((SECONDS - started)) s |" >>"$out/steps.md"
    return 0
}
: >"$out/steps.md"

write_summary() {  # also on an early exit: whatever ran is in summary.md
    {
        echo "# stable-cnn GPU check ($(date -u +%Y-%m-%d), $($dry && echo dry run on the CPU || echo "$device"))"
        echo
        echo '```'
        cat "$out/facts.log" 2>/dev/null
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        echo '```'
        echo
        echo "| step | status | time |"
        echo "|---|---|---:|"
        cat "$out/steps.md"
        echo
        echo "## cuda tests"
        echo
        echo '```'
        tail -n 14 "$out/cuda_tests.log" 2>/dev/null
        echo '```'
        for name in "${benchmarks[@]}"; do
            echo
            echo "## $name"
            echo
            if grep -q '^| path' "$out/$name.log" 2>/dev/null; then
                grep -E '^(\||CPU|SmallCNN)' "$out/$name.log"
            else  # cut short: the rows it finished, as it printed them
                echo '```'
                grep -E '^  ' "$out/$name.log" 2>/dev/null
                echo '```'
            fi
        done
        echo
        echo "## torchrun, one process"
        echo
        echo '```'
        grep -E "device |test of best" "$out/torchrun_one_process.log" 2>/dev/null | sed 's/^.*\] - //'
        echo '```'
        echo
        echo "## time to accuracy: ${preset[*]}"
        echo
        "$py" -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(f\"test accuracy {r['test_acc']:.2f}% (best val {r['best_val_acc']:.2f}%, epoch {r['best_epoch']}), \"
      f\"{r['epochs']} epochs, {r['wall_s']:.1f} s in train() on {r['device']}, {r['precision']}\")
" "$out/time_to_accuracy.json" 2>/dev/null || echo "no result: see time_to_accuracy.log"
    } >"$summary"
    rm -rf "$data_root" "$runs" "$out/steps.md" "$out/facts.log"  # both are in summary.md
}
benchmarks=()
trap write_summary EXIT

if $dry; then
    device=cpu
    bench=(--device cpu --width 8 --steps 2 --warmup 1 --quick)
    sizes=(32 64)
    preset=(experiment=smoke trainer.device=cpu data.limit_train=1024 data.limit_test=512 trainer.epochs=1)
    small=("${preset[@]}")
    graph=()
else
    device=cuda
    bench=(--device cuda --width 64 --steps 200 --warmup 10 --quick)
    sizes=(128 512)
    preset=(experiment=fashion_mnist_gpu)
    small=(experiment=smoke)
    graph=(--cuda-graph)
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
step cuda_tests 200 "$py" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -rs
step time_to_accuracy 240 "$py" -m stable_cnn.train "${preset[@]}" "data.root=$data_root" \
    "data.system_dir=$system_dir" trainer.progress_bar=false "hydra.run.dir=$runs/preset"
cp "$runs/preset/results.json" "$out/time_to_accuracy.json" 2>/dev/null
# torchrun with one process: the DDP path of many (process group, NCCL on the GPU, the
# sharded evaluation's all-reduce), on the one GPU there is
step torchrun_one_process 90 "$py" -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m stable_cnn.train "${small[@]}" "data.root=$data_root" "data.system_dir=$system_dir" \
    trainer.progress_bar=false "hydra.run.dir=$runs/torchrun"
for size in "${sizes[@]}"; do
    benchmarks+=("benchmark_b$size")
    step "benchmark_b$size" 90 "$py" scripts/benchmark.py --dataset cifar10-synthetic \
        --precisions fp16,bf16 --batch-size "$size" "${bench[@]}" ${graph[@]+"${graph[@]}"}
done
if ! $dry; then  # torch.compile: minutes of compiling on a CPU, so only on the GPU
    benchmarks+=("benchmark_b512_compile")
    step benchmark_b512_compile 120 "$py" scripts/benchmark.py --dataset cifar10-synthetic \
        --precisions bf16 --batch-size 512 --compile "${bench[@]}"
fi

trap - EXIT
write_summary
cat "$summary"
exit $failed
