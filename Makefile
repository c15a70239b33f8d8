# One command each: `make demo` (set up + train/export/infer on the built-in SYNTHETIC set),
# `make test` (set up + run the test suite), `make predict DATA=folder` (shipped model, no training).
PY   ?= python
DATA ?= ../shared/data/cxr4
OUT  ?= out

.PHONY: install demo test predict benchmark
install:
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .

demo: install
	$(PY) -m cxrkit.synthetic --out demo_data --per_class 40
	$(PY) model_arch.py --data_dir demo_data --output_dir demo_out --img_size 64 \
	    --num_epochs 12 --batch_size 16 --workers 2 --overwrite
	$(PY) export_to_onnx.py --checkpoint demo_out/model_checkpoints/best_covid_model.pth \
	    --onnx_path demo_out/models/covid_multitask.onnx --overwrite
	$(PY) run_onnx_inference.py --data_dir demo_data --onnx_path demo_out/models/covid_multitask.onnx \
	    --save_dir demo_out/predictions_onnx --num_samples 12 --overwrite
	$(PY) run_model_pth_inference.py --data_dir demo_data \
	    --checkpoint demo_out/model_checkpoints/best_covid_model.pth \
	    --save_dir demo_out/predictions_pth --num_samples 12 --gradcam --overwrite
	@echo "demo done: see demo_out/ (SYNTHETIC data: the numbers mean nothing clinically)"

test: install
	$(PY) -m pytest tests -q

predict: install
	$(PY) run_onnx_inference.py --data_dir $(DATA) --save_dir $(OUT)/predictions --num_samples 48 --overwrite

benchmark: install
	$(PY) scripts/benchmark_inference.py --n_images 48 --seed_arch_baseline
