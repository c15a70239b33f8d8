#!/usr/bin/env bash
# LENT-GPU HELPER: trained the earlier from-scratch variant table (docs/variants, docs/variant_table_v1.md) on a lent GPU machine (see MODEL_CARD.md "Training" and docs/TRAINING.md "Variant table").
# Carried: .whl (MONAI + efficientnet-lite0 wheels), .devcache (packed 128-px cache of cxr4 + the split file).
# Env: ARCHS, EPOCHS, BS, LR, BUDGET_<arch> (minutes cap per run, a guard only).
set -u
source scripts/lent_gpu/setup.sh
ARCHS=${ARCHS:-"small seed tiny seed_ms"}
for arch in $ARCHS; do
  d=runs/$arch; mkdir -p $d; cp .devcache/split.json $d/split.json
  budget_var=BUDGET_$arch; budget=${!budget_var:-2}
  start=$(date +%s)
  python3 model_arch.py --data_dir $CACHE --img_size 128 --arch $arch --num_epochs ${EPOCHS:-40} \
      --batch_size ${BS:-64} --lr ${LR:-2e-3} --workers 4 --output_dir $d --quiet --max_minutes $budget \
      ${EXTRA:-} 2>&1 | grep -v "^INFO" | tee $d/train.log
  echo "$arch wall $(( $(date +%s) - start ))s" | tee -a "$OUT/walls.txt"
  files="model_checkpoints/training_summary.json model_checkpoints/training_curves.png test_results split.json train.log"
  case $arch in seed|seed_ms) ;; *) files="$files model_checkpoints/best_covid_model.pth";; esac
  (cd $d && tar czf "$OUT/$arch.tgz" $files 2>/dev/null)
done
ls -la "$OUT"
