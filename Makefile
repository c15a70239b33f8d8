# One command each: `make demo` (set up + train/export/infer on the built-in SYNTHETIC set),
# `make test` (set up + run the test suite), `make predict DATA=folder` (shipped model, no training).
PY   ?= python
DATA ?= ../shared/data/cxr4
OUT  ?= out

.PHONY: install demo test predict benchmark
install:
	$(PY) -m pip install -q -r requirements.txt

# SYNTHETIC images (cxrkit.training.synthetic): the classes differ inside the lungs; the model is scored on a
# separately generated held-out set (another seed) that training never sees.
# one thread per process: the same float sums every run (the demo's figure does not move with the machine's
# load) and no oversubscription when the 2 cores are busy; set OMP_NUM_THREADS to override
demo: export OMP_NUM_THREADS ?= 1
demo: install
	$(PY) -m cxrkit synth --out demo_data --per_class 40
	$(PY) -m cxrkit synth --out demo_heldout --per_class 10 --seed 1
	$(PY) model_arch.py --data_dir demo_data --output_dir demo_out --img_size 64 \
	    --num_epochs 18 --batch_size 8 --workers 0 --overwrite --quiet
	$(PY) export_to_onnx.py --checkpoint demo_out/model_checkpoints/best_covid_model.pth \
	    --onnx_path demo_out/models/covid_multitask.onnx --overwrite
	$(PY) run_model_pth_inference.py --data_dir demo_data \
	    --checkpoint demo_out/model_checkpoints/best_covid_model.pth \
	    --save_dir demo_out/predictions_pth --num_samples 12 --gradcam --overwrite --quiet
	$(PY) run_onnx_inference.py --data_dir demo_heldout --onnx_path demo_out/models/covid_multitask.onnx \
	    --save_dir demo_out/heldout_onnx --num_samples 0 --overwrite --quiet
	@echo "demo done: see demo_out/ (SYNTHETIC data: the numbers mean nothing clinically; the last line is the held-out set)"

test: install
	$(PY) -m pytest tests -q -rs

predict: install
	$(PY) run_onnx_inference.py --data_dir $(DATA) --save_dir $(OUT)/predictions --num_samples 48 --overwrite

# the real-use benchmark (docs/SPEED.md): whole process, 256-px and full-size PNG, DICOM and JPEG, default and
# bulk mode, beside the plain seed pipeline; run it on an idle machine
benchmark: install
	$(PY) -m pip install -q -e .[bench]
	$(PY) scripts/benchmark_real_use.py --model_only --memory_check
