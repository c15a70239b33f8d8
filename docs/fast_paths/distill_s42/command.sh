python model_arch.py --data_dir COMBO --folds 10 --fold 0 --fold_seed 0 --seed 42 --num_epochs 5 \
  --aug_clahe 0.5 --aug_gamma 0.3 --aug_shifts 0.3 --balance_sources --source_rule '/images/(.+?)__' \
  --init_from runs/distill/member0.pth --teacher model_checkpoints/best_covid_model.pth \
  --lr 3e-4 --warmup_epochs 0 --output_dir runs/distill/s42 --cache_dir runs/distill/cache \
  --resume --max_minutes 45 --quiet > runs/distill/s42.log 2>&1
echo done > runs/distill/done
