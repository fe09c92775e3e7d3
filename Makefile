# UniFuseSlicer developer entry points. Every target creates/refreshes the local virtual
# environment (.venv) itself, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned: this takes the CPU wheel and keeps pip from pulling CUDA packages.
TORCH  ?= torch==2.13.0
DEMO_OUT ?= demo_output

.PHONY: venv demo test bench info sample-data screenshots clean

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

# The benchmark (several minutes on 2 cores): UniFuse vs registration + fusion baselines -> bench_output/.
bench: venv
	$(VPY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(VENV)/bin/unifuse bench --out bench_output

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
