#!/bin/bash
# Every distillation loss against the same student trained from scratch, same batches and steps
# (gin_configs/experiments/distill_larger.gin), two runs at a time, niced. Then the report:
#   tools/distill_arms.sh TEACHER_RUN OUT_DIR "SEEDS_ALL" "SEEDS_EXTRA"
#   e.g. tools/distill_arms.sh runs/compress/larger runs/distill_arms "0 1" "0"
# SEEDS_ALL: seeds for scratch, forward KL, reverse KL, JSD, forward KL + hard labels;
# SEEDS_EXTRA: seeds for offline top-32 and on-policy GKD. Run from the repository root.
set -euo pipefail
teacher=${1:?teacher run dir}; out=${2:?output dir}; seeds_all=${3:-"0 1"}; seeds_extra=${4:-"0"}
mkdir -p "$out"
declare -A ARM=(
  [scratch]="--gin_param=DistillLoss.alpha=1.0"
  [fkl]="--gin_param=DistillLoss.divergence='forward_kl'"
  [rkl]="--gin_param=DistillLoss.divergence='reverse_kl'"
  [jsd]="--gin_param=DistillLoss.divergence='jsd' --gin_param=DistillLoss.beta=0.5"
  [fkl_hard]="--gin_param=DistillLoss.divergence='forward_kl' --gin_param=DistillLoss.alpha=0.5"
  [offline_k32]="--gin_param=distill.mode='offline' --gin_param=distill.top_k=32"
  [gkd]="--gin_param=DistillLoss.divergence='jsd' --gin_param=DistillLoss.beta=0.5 --gin_param=OnPolicy.fraction=0.5"
)
jobs=()
for seed in $seeds_all; do for arm in scratch fkl rkl jsd fkl_hard; do jobs+=("$arm $seed"); done
  for arm in offline_k32 gkd; do [[ " $seeds_extra " == *" $seed "* ]] && jobs+=("$arm $seed"); done
done
for seed in $seeds_extra; do [[ " $seeds_all " == *" $seed "* ]] || \
  for arm in offline_k32 gkd; do jobs+=("$arm $seed"); done; done
run_one() {
  local arm=$1 seed=$2 dir="$out/${1}_seed$2"
  [ -f "$dir/eval.json" ] && return 0
  # shellcheck disable=SC2086
  nice -n 5 python -m experiments.distill --gin_file=gin_configs/experiments/distill_larger.gin \
    --gin_param="distill.teacher_run='$teacher'" --gin_param="distill.run_dir='$dir'" \
    --gin_param=TrainConfig.seed="$seed" ${ARM[$arm]} > "$dir.log" 2>&1 \
    && echo "$(date -u +%T) done $arm seed $seed" || echo "$(date -u +%T) FAILED $arm seed $seed"
}
export -f run_one; export out teacher
export ARM_DEFS; ARM_DEFS=$(declare -p ARM)
printf '%s\n' "${jobs[@]}" | xargs -P 2 -L 1 bash -c 'eval "$ARM_DEFS"; run_one "$0" "$1"'
