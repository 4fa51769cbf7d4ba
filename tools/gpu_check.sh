#!/usr/bin/env bash
# The project's GPU check: one call of under 9 minutes on one H100 or H200 that measures every experiment
# (docs/speed-and-memory.md, "The GPU check"), and its preparation where PyPI can be reached:
#   bash tools/gpu_check.sh --prepare [--data DIR]
#   bash tools/gpu_check.sh OUT_DIR [--data DIR] [--wheels DIR] [--budget SECONDS] [--suite-epochs N]
#                           [--experiments NAME...] [--steps NAME,NAME...] [--dry-run]
# --prepare copies the data into .gpu_data/ (default ../shared/data/brain_mri beside the checkout), fills .whl/ with
# the wheels the GPU image lacks at the versions installed here, checks that what travels stays under the device
# tool's 64 MiB, and prints the command to run there, the folders to carry and the time limit.
# OUT_DIR and OUT_DIR/gpu_check.log exist from the first second (a refused argument is written there too);
# OUT_DIR/gpu_check.json holds every step's status (ok, failed, timed out, skipped or not run, with its reason)
# and result, rewritten as each step ends. The steps, in this order, each with its share of --budget fixed up
# front (tools/gpu_check.py's STEPS; 530 s in all), a smaller budget cutting them from the end:
#   wheels (with --wheels) the wheels whose version the machine lacks; env: versions, every requirement checked;
#   cuda_tests: tests/test_cuda.py; bench: tools/bench.py for every classification experiment at ViT-B/16 size
#   (random:vit-b16, bf16, batch 32); bench_compile: E4 and E6 with --compile, against bench's eager figures;
#   e8_step: E8 at ViT-L/14 + GPT-2 size, random weights; syncs: E3 under torch.cuda.set_sync_debug_mode("warn");
#   suite: run_all_experiments.py (random:vit-b16, seed 0, --suite-epochs epochs, default 3) timed by phase.
# --data: the image folder (default ../shared/data/brain_mri, which does not travel: pass .gpu_data/brain_mri).
# --experiments: bench and the suite run only these. --steps: only these steps, e.g. to finish in a second call
# what the first ran out of time for. --dry-run: every step at --smoke size on the CPU, 1 epoch, MFU against a
# nominal 1 TFLOP/s (tests/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
usage() { sed -n '4,6p' "$0" >&2; exit 2; }

if [ "${1:-}" = --prepare ]; then
  shift
  exec "$python" tools/gpu_check.py prepare "$@"
fi
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
out=$1; shift
mkdir -p "$out" || { echo "error: cannot make the results folder $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
log=$out/gpu_check.log
result=$out/gpu_check.json
rm -f "$result"
echo "gpu_check: started $(date -u '+%Y-%m-%d %H:%M:%S UTC'): tools/gpu_check.sh $out $*" > "$log"
# refuse MESSAGE: a bad argument, as one line on stderr and in the log, before any step runs.
refuse() { echo "error: $*" >&2; echo "error: $*" >> "$log"; exit 2; }

data=""; wheels=""; dry_run=0; suite_epochs=3; budget=""; only=(); steps=""
while [ $# -gt 0 ]; do
  case $1 in
    --data|--wheels|--suite-epochs|--budget|--steps)
      [ $# -ge 2 ] || refuse "$1 needs a value"
      case $1 in
        --data) data=$2 ;; --wheels) wheels=$2 ;; --suite-epochs) suite_epochs=$2 ;; --budget) budget=$2 ;;
        --steps) steps=$2 ;;
      esac
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --experiments) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do only+=("$1"); shift; done ;;
    *) refuse "unknown argument $1: see the top of tools/gpu_check.sh" ;;
  esac
done
if [ $dry_run = 1 ]; then data=${data:-sample_data/brain_mri}; else data=${data:-../shared/data/brain_mri}; fi
[ -d "$data" ] || refuse "data folder $data does not exist: pass --data a folder with train/<class>/* and" \
  "test/<class>/* (bash tools/gpu_check.sh --prepare copies one into .gpu_data/)"
if [ -n "$wheels" ]; then
  [ -d "$wheels" ] || refuse "wheel folder $wheels does not exist: bash tools/gpu_check.sh --prepare fills .whl/"
  wheels=$(cd "$wheels" && pwd)
fi
[[ $suite_epochs =~ ^[1-9][0-9]*$ ]] || refuse "--suite-epochs must be a whole number of at least 1, not $suite_epochs"
[ -z "$budget" ] || [[ $budget =~ ^[0-9]+$ ]] || refuse "--budget must be a whole number of seconds, not $budget"
data=$(cd "$data" && pwd)
helper=("$python" tools/gpu_check.py --result "$result")
chosen=()
if [ -n "$steps" ]; then IFS=, read -r -a chosen <<< "$steps"; fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# The plan: each step with the time by which it must end, written into gpu_check.json before the first one runs.
plan_args=(plan ${budget:+--budget "$budget"})
[ ${#chosen[@]} -eq 0 ] || plan_args+=(--steps "${chosen[@]}")
[ -n "$wheels" ] || plan_args+=(--no-wheels)
"${helper[@]}" "${plan_args[@]}" > "$scratch/plan" 2> "$scratch/plan.err" ||
  refuse "$(grep -v '^\s*$' "$scratch/plan.err" | tail -n 1 | sed 's/^.*error: //')"
declare -A deadline
while read -r name share end; do deadline[$name]=$end; done < "$scratch/plan"

exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$SECONDS
limit=0

# record NAME STATUS [REASON [SECONDS [JSON]]]: the step's status into gpu_check.json, with the JSON file it wrote.
record() {
  local args=(--step "$1" record --status "$2" --limit "$limit")
  [ -z "${3:-}" ] || args+=(--reason "$3")
  [ -z "${4:-}" ] || args+=(--seconds "$4")
  [ -z "${5:-}" ] || args+=(--json "$5")
  "${helper[@]}" "${args[@]}"
}
# begin NAME: whether the step runs; sets $limit, the seconds it has (to its deadline). A step not chosen is not
# mentioned; one beyond the budget is already recorded as not run by the plan.
begin() {
  local name=$1
  [ -n "${deadline[$name]+set}" ] || return 1
  if [ "${deadline[$name]}" = - ]; then
    echo "=== $name: not run, beyond the budget ==="
    return 1
  fi
  limit=$((deadline[$name] - (SECONDS - started)))
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, out of time ==="
    record "$name" skipped "out of time: the steps before it ran to $((SECONDS - started)) s, its deadline is" \
      "${deadline[$name]} s"
    return 1
  fi
  echo "=== $name (at most $limit s) ==="
}
# skip NAME REASON: a chosen step that does not apply to this run.
skip() {
  [ -n "${deadline[$1]+set}" ] && [ "${deadline[$1]}" != - ] || return 0
  echo "=== $1: skipped, $2 ==="
  limit=0
  record "$1" skipped "$2"
}
# run NAME [--json FILE] COMMAND...: runs COMMAND for at most $limit seconds; records how it ended and why.
run() {
  local name=$1 json="" t0=$SECONDS code status reason=""; shift
  if [ "$1" = --json ]; then json=$2; shift 2; fi
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$scratch/$name.out"
  code=${PIPESTATUS[0]}
  case $code in
    0) status=ok ;;
    124|137) status="timed out"; reason="stopped at its limit of $limit s" ;;
    *) status=failed; reason="exit $code: $(grep -v '^\s*$' "$scratch/$name.out" | tail -n 1 | cut -c1-400)" ;;
  esac
  echo "=== $name: $status in $((SECONDS - t0)) s ==="
  record "$name" "$status" "$reason" $((SECONDS - t0)) "$json"
  [ "$code" = 0 ]
}

if [ ${#only[@]} -gt 0 ]; then only=(--experiments "${only[@]}"); fi
if [ $dry_run = 1 ]; then
  model=tiny-random-clip; size=(--smoke); epochs=1
  # No GPU: tests/test_cuda.py skips whole, before it imports the fixtures (so none are loaded), and pytest
  # reports a run whose every test skipped as exit 5.
  cuda_tests=(bash -c '"$@"; code=$?; exit $((code == 5 ? 0 : code))' all-skipped
              "$python" -m pytest -q --noconftest -o addopts= tests/test_cuda.py)
  quick=(--smoke --steps 1 --warmup 1 --peak-tflops 1 --batch-size 4)
  bench=("${quick[@]}" --e2-epochs 1 --e2-images 8 8); compiled=("${quick[@]}"); e8=("${quick[@]}")
else
  model=random:vit-b16; size=(); epochs=$suite_epochs
  # One process, none of the image's pytest plugins (their versions were not tested here), no -n workers.
  cuda_tests=(env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$python" -m pytest -q -o addopts= -p no:cacheprovider
              tests/test_cuda.py)
  bench=(--model $model --batch-size 32); compiled=("${bench[@]}"); e8=(--model random:vit-l14 --batch-size 32)
fi
echo "gpu_check: $model, data $data, results in $out$([ $dry_run = 1 ] && echo ', dry run'); the plan:"
sed 's/^/  /' "$scratch/plan"

if begin wheels; then
  site=$scratch/site
  run wheels "${helper[@]}" --step wheels wheels "$wheels" --target "$site" &&
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
plan_file=()
[ -z "$wheels" ] || [ ! -f "$wheels/plan.json" ] || plan_file=(--plan "$wheels/plan.json")
begin env && run env "${helper[@]}" --step env env "${plan_file[@]}"
begin cuda_tests && run cuda_tests "${cuda_tests[@]}"
begin bench && run bench --json "$scratch/bench/bench.json" "$python" tools/bench.py "${bench[@]}" "${only[@]}" \
  --output-dir "$scratch/bench"
# E4 and E6: the prompts through every layer, and every weight trained (the issue that asked for it: 37).
compile_only=()
for name in E4_deep_vpt E6_full_finetune; do
  [ ${#only[@]} -eq 0 ] || [[ " ${only[*]} " == *" $name "* ]] && compile_only+=("$name")
done
if [ ${#compile_only[@]} -eq 0 ]; then
  skip bench_compile "neither E4_deep_vpt nor E6_full_finetune is among --experiments"
elif begin bench_compile; then
  run bench_compile --json "$scratch/compile/bench.json" "$python" tools/bench.py "${compiled[@]}" --compile \
    --experiments "${compile_only[@]}" --output-dir "$scratch/compile"
fi
begin e8_step && run e8_step --json "$scratch/e8/bench.json" "$python" tools/bench.py "${e8[@]}" \
  --experiments E8_caption_peft --output-dir "$scratch/e8"
begin syncs && run syncs "${helper[@]}" --step syncs syncs --model $model --data "$data" "${size[@]}"
# The suite stops itself 15 s before its limit, so that the experiments that finished are still recorded.
begin suite && run suite "${helper[@]}" --step suite suite --model $model --data "$data" --epochs $epochs \
  "${size[@]}" "${only[@]}" --timeout $((limit > 30 ? limit - 15 : limit))
"${helper[@]}" summary   # exit 1 where a step failed or timed out
code=$?
echo "gpu_check: $((SECONDS - started)) s in all; results in $result and $log"
exec >&- 2>&-
wait   # for tee to write the log's last lines
exit $code
