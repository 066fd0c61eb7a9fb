#!/usr/bin/env bash
# Shared body of the four MOOD entry points (run_{pixel,sample}_{brain,abdom}.sh):
#
#   run_mood.sh pixel|sample|both brain|abdom input_folder output_folder
#
# Runs the bundle's inference workflow (python -m scripts.predict) on every scan of input_folder and writes its
# predictions into output_folder (pixel: the <name> NIfTI map, sample: the <name>.txt score, both: both from one pass
# of the ensemble; the MOOD entry points use one task each, as the challenge requires). Works in two layouts:
#   - the image (docker/Dockerfile): scripts in /workspace, bundle in /workspace/bundle, venv in /opt/venv;
#   - a checkout: scripts in <repo>/docker, bundle in <repo>/bundle, venv in <repo>/.venv (`make setup`).
# MOOD runs the container --read-only with only the output folder writable (/mnt/pred), so everything the
# run writes (temporary files, caches) goes to a hidden temporary folder inside the output folder, removed
# at the end: the output folder holds only the predictions afterwards. Logs go to stdout/stderr only.
#
# Optional environment:
#   MOOD_PYTHON      the Python to run (default: /opt/venv/bin/python in the image, <repo>/.venv/bin/python)
#   MOOD_MODELS_DIR  folder with brain/ and abdom/ subfolders of trained models (default: <bundle>/models),
#                    e.g. runs/models after `make train`; 3D, slice-wise (KIND=2d) or voxel classifiers alike:
#                    their plans.json says which
#   MOOD_ALLOW_PARTIAL_ENSEMBLE=1  score with the folds there are when some of the plan's folds are missing
#                    (e.g. after `make train ... ARGS="--folds 0"`); default: such a models folder is an error
#   MOOD_WORKLIST=1  also write output_folder/scores.csv, the worklist (one row per scan: score, flagged, where
#                    the map peaks); default: only MOOD's files
#   MOOD_DRY_RUN=1   print the command and its environment, run nothing (the image build uses it as a check)
#
# Exit code: 0 when every scan has its outputs (a failed case gets the fallback score, which counts as written),
# 3 when some scans lack one (pixel and both modes: the map of an unreadable scan), other non-zero codes for errors
# that stopped the run (bad arguments, missing models).
set -euo pipefail

usage() {
    if [[ "${1:-}" =~ ^(pixel|sample)$ && "${2:-}" =~ ^(brain|abdom)$ ]]; then
        echo "usage: run_${1}_${2}.sh input_folder output_folder"
    else
        echo "usage: run_mood.sh pixel|sample|both brain|abdom input_folder output_folder"
    fi
}

die() {
    echo "run_mood: error: $*" >&2
    exit 1
}

if [[ "${3:-}" == "-h" || "${3:-}" == "--help" ]]; then
    usage "$@"
    exit 0
fi
if [[ $# -ne 4 || ! "$1" =~ ^(pixel|sample|both)$ || ! "$2" =~ ^(brain|abdom)$ ]]; then
    usage "$@" >&2
    exit 2
fi
mode=$1
dataset=$2

# --- the folders, as absolute paths (MOOD: absolute paths only) ---
[[ -n "$3" ]] || die "the input folder is an empty string"
[[ -n "$4" ]] || die "the output folder is an empty string"
[[ -e "$3" ]] || die "input folder '$3' does not exist"
[[ -d "$3" ]] || die "input '$3' is not a folder"
input=$(cd -- "$3" && pwd)
mkdir -p -- "$4" || die "cannot create the output folder '$4'"
output=$(cd -- "$4" && pwd)
[[ "$mode" == sample || "$input" != "$output" ]] || die "the output folder is the input folder: the pixel maps \
would replace the scans (they carry the scans' names); choose another output folder"
[[ -w "$output" ]] || die "output folder '$output' is not writable by uid $(id -u) (in Docker: the default image \
runs as root; one built with RUN_AS=mood needs --build-arg USER_UID=<owner's uid>; or make the folder writable)"

# --- the bundle and the Python ---
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -f "$here/bundle/configs/metadata.json" ]]; then    # the image: /workspace/run_*.sh, /workspace/bundle
    bundle="$here/bundle"
    default_python=/opt/venv/bin/python
    missing_python="no virtual environment at /opt/venv: build the image with docker/Dockerfile"
elif [[ -f "$here/../bundle/configs/metadata.json" ]]; then    # a checkout: <repo>/docker/run_*.sh
    repo=$(cd "$here/.." && pwd)
    bundle="$repo/bundle"
    default_python="$repo/.venv/bin/python"
    missing_python="no virtual environment at $repo/.venv: run 'make setup' in $repo first"
else
    die "no bundle found next to $here (expected $here/bundle or $here/../bundle)"
fi
for config in common.yaml inference.yaml "$dataset.yaml" metadata.json; do
    [[ -f "$bundle/configs/$config" ]] || die "missing $bundle/configs/$config"
done

if [[ -n "${MOOD_PYTHON:-}" ]]; then
    python=$(command -v -- "$MOOD_PYTHON") || die "MOOD_PYTHON '$MOOD_PYTHON' is not an executable or a command on PATH"
    [[ -x "$python" ]] || die "MOOD_PYTHON '$MOOD_PYTHON' is not executable"
    if [[ "$python" != /* ]]; then    # a relative path: make it absolute, the run leaves the current folder
        python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
    fi
else
    [[ -x "$default_python" ]] || die "$missing_python"
    python=$default_python
fi

# the bundle's inference workflow as one plain command (bundle/scripts/predict.py)
cmd=("$python" -m scripts.predict -i "$input" -o "$output" -d "$dataset" --mode "$mode")
if [[ "${MOOD_WORKLIST:-0}" == 1 ]]; then
    cmd+=(--worklist)    # also scores.csv; default: MOOD's files only
fi
if [[ -n "${MOOD_MODELS_DIR:-}" ]]; then
    [[ -d "$MOOD_MODELS_DIR" ]] || die "MOOD_MODELS_DIR '$MOOD_MODELS_DIR' is not a folder"
    cmd+=(-m "$(cd "$MOOD_MODELS_DIR" && pwd)")
fi
if [[ "${MOOD_ALLOW_PARTIAL_ENSEMBLE:-0}" == 1 ]]; then
    cmd+=(--allow_partial_ensemble)
fi

# --- everything the run writes goes into a temporary folder inside the output folder ---
tmp=$(mktemp -d "$output/.mood_tmp.XXXXXX") || die "cannot create a temporary folder in '$output'"
trap 'rm -rf -- "$tmp"' EXIT
mkdir -p "$tmp/home" "$tmp/cache" "$tmp/config" "$tmp/data" "$tmp/state"
export TMPDIR="$tmp" TMP="$tmp" TEMP="$tmp"
export HOME="$tmp/home"    # anything HOME-based (~/.cache, ~/.config, ~/.nv, ~/nilearn_data, ...)
export XDG_CACHE_HOME="$tmp/cache" XDG_CONFIG_HOME="$tmp/config" XDG_DATA_HOME="$tmp/data" XDG_STATE_HOME="$tmp/state"
export MPLCONFIGDIR="$tmp/cache/matplotlib"
export TORCH_HOME="$tmp/cache/torch" TORCHINDUCTOR_CACHE_DIR="$tmp/cache/torchinductor"
export TORCH_EXTENSIONS_DIR="$tmp/cache/torch_extensions" TRITON_CACHE_DIR="$tmp/cache/triton"
export CUDA_CACHE_PATH="$tmp/cache/nv_compute"
export HF_HOME="$tmp/cache/huggingface" MONAI_DATA_DIRECTORY="$tmp/data/monai" NUMBA_CACHE_DIR="$tmp/cache/numba"
export NILEARN_DATA="$tmp/data/nilearn" NILEARN_SHARED_DATA="$tmp/data/nilearn"
# No .pyc is written (not into the checkout, nor the read-only image). PYTHONPYCACHEPREFIX is left unset on
# purpose: Python then ignores every prebuilt __pycache__ (the venv's), and importing torch, MONAI, SciPy and
# scikit-learn from source cost 8-12 s more per run (measured 4.4-5.5 s vs 12.8-16.3 s).
export PYTHONDONTWRITEBYTECODE=1 PYTHONNOUSERSITE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$bundle"    # the bundle's code is imported as `scripts` (MONAI bundle convention)
# MONAI's notice that a bundle config is trusted code (this one is), by name (scripts.MONAI_CONFIG_NOTICE_FILTER)
export PYTHONWARNINGS="ignore:parsing config_file:UserWarning:monai.bundle.scripts"
cd "$tmp"    # stray relative writes land in the temporary folder too

echo "run_mood: $mode/$dataset: $input -> $output"
echo "run_mood: PYTHONPATH=$PYTHONPATH TMPDIR=$TMPDIR"
echo "run_mood: running:$(printf ' %q' "${cmd[@]}")"
if [[ "${MOOD_DRY_RUN:-0}" == 1 ]]; then
    echo "run_mood: dry run, nothing was run"
    exit 0
fi

# Run in the background and forward INT/TERM, so `docker stop` (the script is PID 1 there) stops the inference
# too, and the temporary folder is removed on the way out.
"${cmd[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do    # wait was cut short by a signal: wait for the inference itself
    rc=0
    wait "$child" || rc=$?
done
if [[ $rc -eq 3 ]]; then
    # some cases failed (named above), every other one was scored: exit 0 when every scan still has its outputs
    # (a score: the fallback one), so the grader scores what was written
    missing=0
    shopt -s nullglob nocaseglob
    for scan in "$input"/*.nii.gz "$input"/*.nii; do
        name=$(basename -- "$scan")
        if [[ ($mode != sample && ! -f "$output/$name") || ($mode != pixel && ! -f "$output/$name.txt") ]]; then
            missing=$((missing + 1))
        fi
    done
    shopt -u nullglob nocaseglob
    if [[ $missing -eq 0 ]]; then
        echo "run_mood: some cases failed (see above), but every scan has its output" >&2
        rc=0
    else
        echo "run_mood: $missing scans have no output (see the failures above)" >&2
    fi
elif [[ $rc -ne 0 ]]; then
    echo "run_mood: inference failed with exit code $rc" >&2
fi
exit "$rc"
