# Two entry points (see README): `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: install demo test bench clean

# --no-compile, then one import of what mlkd and its tests load: only those modules get byte-compiled, not all of
# torch (26 s saved), and they are compiled once even where PYTHONDONTWRITEBYTECODE is set (each process would
# otherwise compile torch again: 10 s an import instead of 5)
WARM := torch torchvision cv2 numpy PIL matplotlib.figure lmdb safetensors yaml tqdm mlkd.cli.app mlkd.api 	mlkd.training.student mlkd.training.teacher mlkd.demo onnx onnxruntime scipy.io sklearn.metrics fastapi uvicorn
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e '.[dev]'
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c "import importlib; [importlib.import_module(m) for m in '$(WARM)'.split()]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mlkd demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_proposals.py
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_teacher.py
	$(BIN)/python benchmarks/bench_student.py
	$(BIN)/python benchmarks/bench_backbones.py
	$(BIN)/python benchmarks/bench_image_identity.py

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
