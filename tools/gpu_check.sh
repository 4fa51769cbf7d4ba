#!/usr/bin/env bash
# The project's GPU check, in one call of under 9 minutes on one H100 or H200 (docs/speed-and-memory.md):
#   tools/gpu_check.sh OUT_DIR [--data DIR] [--wheels DIR] [--suite-epochs N] [--budget SECONDS]
#                      [--experiments NAME...] [--steps NAME,NAME...] [--dry-run]
# Steps, in this order, each within what is left of --budget (default 530 s), each recorded whether it passed,
# failed or ran out of time: the versions (python, torch, CUDA, GPU, driver); the wheels of --wheels that the
# machine lacks (tools/fill_wheels.sh fills that folder where PyPI can be reached); the CUDA tests
# (tests/test_cuda.py); tools/bench.py at full size (random:vit-b16) at batch 32, then at the largest batch at
# which E6 trains; E3 with torch.cuda.set_sync_debug_mode("warn"), syncs counted; the default suite
# (run_all_experiments.py, random:vit-b16, seed 0, --suite-epochs epochs, default 10) timed phase by phase;
# the suite again with --compile. OUT_DIR gets gpu_check.json (every step's result) and gpu_check.log.
# --data defaults to ../shared/data/brain_mri, which is not on the device machine: copy it into an ignored
# folder of the repository and pass that. --experiments: bench and the suites run only these (default: all).
# --steps: only these steps (env,wheels,cuda_tests,bench_batch_32,max_batch,bench_largest_batch,syncs,suite,
# suite_compile), e.g. to finish in a second call what the first ran out of time for.
# --dry-run: every step at --smoke size on the CPU, 1 epoch, MFU against a nominal peak (tests/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,4p' "$0" >&2; exit 2; }
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
out=$1; shift
data=""; wheels=""; dry_run=0; suite_epochs=10; budget=530; only=(); steps=all
while [ $# -gt 0 ]; do
  case $1 in
    --data) data=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --suite-epochs) suite_epochs=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --experiments) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do only+=("$1"); shift; done ;;
    *) echo "error: unknown argument $1" >&2; usage ;;
  esac
done
if [ $dry_run = 1 ]; then
  data=${data:-sample_data/brain_mri}
else
  data=${data:-../shared/data/brain_mri}
fi
if [ ! -d "$data" ]; then
  echo "error: data folder $data does not exist: pass --data a folder with train/<class>/* and test/<class>/*" >&2
  exit 2
fi
if [ -n "$wheels" ] && [ ! -d "$wheels" ]; then
  echo "error: wheel folder $wheels does not exist: fill one with tools/fill_wheels.sh" >&2
  exit 2
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd); data=$(cd "$data" && pwd)
result=$out/gpu_check.json
rm -f "$result" "$out/gpu_check.log"
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
started=$SECONDS
step_json=""

# step NAME CAP COMMAND...: runs COMMAND for at most CAP seconds and what is left of the budget; records it.
step() {
  local name=$1 cap=$2 json=$step_json; shift 2
  step_json=""   # the JSON file the step's command writes, if any: recorded as the step's result
  if [ "$steps" != all ] && [[ ",$steps," != *",$name,"* ]]; then return 1; fi
  local left=$((budget - (SECONDS - started)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, the budget of $budget s is spent ==="
    "$python" tools/gpu_check.py --result "$result" --step "$name" record --status "skipped: out of time"
    return 1
  fi
  echo "=== $name (at most $limit s) ==="
  local t0=$SECONDS code status
  timeout -k 10 "$limit" "$@"
  code=$?
  case $code in
    0) status=ok ;;
    124|137) status="timed out after $limit s" ;;
    *) status="failed (exit $code)" ;;
  esac
  echo "=== $name: $status in $((SECONDS - t0)) s ==="
  "$python" tools/gpu_check.py --result "$result" --step "$name" record --status "$status" \
    --seconds $((SECONDS - t0)) ${json:+--json "$json"}
  [ $code = 0 ]
}
helper=("$python" tools/gpu_check.py --result "$result")

if [ ${#only[@]} -gt 0 ]; then only=(--experiments "${only[@]}"); fi
if [ $dry_run = 1 ]; then
  model=tiny-random-clip; size=(--smoke); epochs=1; first_batch=4
  # No GPU: tests/test_cuda.py skips whole, before it imports the fixtures (so none are loaded), and pytest
  # reports a run whose every test skipped as exit 5.
  cuda_tests=(bash -c '"$@"; code=$?; exit $((code == 5 ? 0 : code))' all-skipped
              "$python" -m pytest -q --noconftest tests/test_cuda.py)
  bench=(--smoke --steps 1 --warmup 1 --e2-epochs 1 --e2-images 8 8 --peak-tflops 1); batch=(--start 2 --limit 4)
else
  model=random:vit-b16; size=(); epochs=$suite_epochs; first_batch=32
  cuda_tests=("$python" -m pytest -q tests/test_cuda.py)
  bench=(--model $model); batch=(--start 32)
fi
echo "gpu_check: $model, data $data, results in $out, budget $budget s$([ $dry_run = 1 ] && echo ', dry run')"

if [ -n "$wheels" ]; then
  site=$scratch/site
  step wheels 120 "${helper[@]}" --step wheels wheels "$wheels" --target "$site" &&
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
step env 60 "${helper[@]}" --step env env
step cuda_tests 120 "${cuda_tests[@]}"
step_json=$scratch/bench32/bench.json
step bench_batch_32 120 "$python" tools/bench.py "${bench[@]}" "${only[@]}" --batch-size $first_batch \
  --output-dir "$scratch/bench32"
step max_batch 90 "${helper[@]}" --step max_batch max-batch --model $model "${batch[@]}"
largest=$("$python" -c "import json, sys; print(json.load(open(sys.argv[1])).get('max_batch', {}).get('largest_batch') or '')" \
  "$result" 2>/dev/null)
if [ -n "$largest" ]; then
  step_json=$scratch/benchmax/bench.json
  step bench_largest_batch 150 "$python" tools/bench.py "${bench[@]}" "${only[@]}" --batch-size "$largest" \
    --output-dir "$scratch/benchmax"
fi
step syncs 120 "${helper[@]}" --step syncs syncs --model $model --data "$data" "${size[@]}"
# The suites stop themselves a little before their step's limit, so that what finished is still recorded.
suite_timeout() { local left=$((budget - (SECONDS - started) - 20)); echo $((left < $1 ? (left > 10 ? left : 10) : $1)); }
step suite 240 "${helper[@]}" --step suite suite --model $model --data "$data" --epochs $epochs "${size[@]}" \
  "${only[@]}" --timeout "$(suite_timeout 220)"
step suite_compile 600 "${helper[@]}" --step suite_compile suite --model $model --data "$data" --epochs $epochs \
  --compile "${size[@]}" "${only[@]}" --timeout "$(suite_timeout 580)"
"$python" tools/gpu_check.py --result "$result" summary
echo "gpu_check: $((SECONDS - started)) s in all; results in $result and $out/gpu_check.log"
exec >&- 2>&-
wait   # for tee to write the log's last lines
