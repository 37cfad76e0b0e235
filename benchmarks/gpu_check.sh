#!/usr/bin/env bash
# The prepared GPU check (target: under 8 minutes on one H100/H200). Each section runs in its own
# process with a time limit, so one failing section still leaves the others' figures.
#
#   bash benchmarks/gpu_check.sh            # real shapes on the GPU
#   bash benchmarks/gpu_check.sh --tiny     # tiny widths: the same code end to end on a CPU (~1-2 min)
#
# Extra arguments go to every section (see python benchmarks/gpu_check.py --help).
set -uo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
py="${PYTHON:-python}"
start=$(date +%s)
failed=()
for section in train prefill merge; do
    limit=240
    [[ $section == prefill ]] && limit=120
    [[ $section == merge ]] && limit=150
    if ! timeout "$limit" "$py" benchmarks/gpu_check.py --section "$section" "$@"; then
        echo "!! section $section failed or ran past ${limit} s" >&2
        failed+=("$section")
    fi
done
echo
echo "gpu_check: $(( $(date +%s) - start )) s in total; failed sections: ${failed[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]
