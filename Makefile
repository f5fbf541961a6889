# gbalance developer targets.  `make test` is the README's (and CI's) test command.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all deps venv lint test unit packaging autopkgtest bench soak deb deb-stdeb rpm apt-repo clean \
	cython compiled pure

all: venv

# System packages the tests use (packaging, man, benchmarks); installed with
# apt-get when missing and we are root.
deps:
	@sh packaging/deps.sh

$(VPY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e . 'pytest>=7'
	@touch $(VPY)

venv: $(VPY)

# Linter and type checker, pinned so CI gives the same answer every time;
# their settings are in pyproject.toml ([tool.ruff], [tool.mypy]).
RUFF_VERSION := 0.8.4
MYPY_VERSION := 1.13.0
LINT_STAMP   := $(VENV)/.lint-$(RUFF_VERSION)-$(MYPY_VERSION)

$(LINT_STAMP): $(VPY)
	$(VPY) -m pip install -q 'ruff==$(RUFF_VERSION)' 'mypy==$(MYPY_VERSION)'
	@touch $@

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check gbalance tests bench
	$(VENV)/bin/mypy

# The optional compiled hot path (gbalance/build.py, setup.py): Cython 3 in
# the venv (make deb and make rpm compile with Debian's cython3 0.29), the
# listed modules compiled in place beside their .py files; "make pure" removes
# them again.  "python3 -m gbalance.build" says which build runs.
CYTHON_SPEC := cython>=3.0,<4

cython: $(VPY)
	$(VPY) -m pip install -q '$(CYTHON_SPEC)'

compiled: cython
	$(VPY) setup.py -q build_ext --inplace
	$(VPY) -m gbalance.build | head -1 | grep -qx compiled || { $(VPY) -m gbalance.build; exit 1; }

pure:
	find gbalance -name '*.so' -delete

# Both ways where a C compiler is present: the whole suite against the
# compiled modules, then the per-connection files against the pure ones
# (less the packaging tests among them: they build from a copy of the tree
# and do not depend on which build this process loaded); without a
# compiler, the whole suite pure.  GBALANCE_EXPECT makes
# tests/test_build.py check that the build asked for is the one loaded.
#
# The whole suite is three pytest runs side by side: the packaging tests
# (package builds, lintian, throwaway roots: mostly one core's work, or
# waiting) in two background runs, the .deb's file (tests/test_packaging.py)
# and the other packaging files (each file builds what it needs, so the two
# share nothing), their output kept in $(PKG_LOG) and $(PKG2_LOG) and shown
# when they end, and the rest in the foreground.  Each run hands out ports
# from a range of its own (GBALANCE_TEST_PORTS, tests/conftest.py); all end
# before "make pure" changes the tree.  A run that selects no test (exit 5,
# say with a PYTEST_ARGS naming one file) counts as passed.
PURE_TESTS ?= tests/test_build.py tests/test_connect.py tests/test_forward.py tests/test_server.py \
	tests/test_e2e_datapath.py
PKG_LOG := $(VENV)/packaging-tests.log
PKG2_LOG := $(VENV)/packaging-tests-2.log
PKG_OTHERS := tests/test_build.py tests/test_packaging_build.py tests/test_packaging_rpm.py \
	tests/test_packaging_stdeb.py

SUITE = \
	GBALANCE_TEST_PORTS=30000-30999 $(VPY) -m pytest -m packaging $(addprefix --ignore=,$(PKG_OTHERS)) \
	    $(PYTEST_ARGS) >$(PKG_LOG) 2>&1 & pkg=$$!; \
	GBALANCE_TEST_PORTS=31000-31999 $(VPY) -m pytest -m packaging --ignore=tests/test_packaging.py \
	    $(PYTEST_ARGS) >$(PKG2_LOG) 2>&1 & pkg2=$$!; \
	GBALANCE_TEST_PORTS=20000-29999 $(VPY) -m pytest -m "not packaging" $(PYTEST_ARGS); status=$$?; \
	wait $$pkg; pkg_status=$$?; wait $$pkg2; pkg2_status=$$?; cat $(PKG_LOG) $(PKG2_LOG); \
	[ $$status -ne 5 ] || status=0; [ $$pkg_status -ne 5 ] || pkg_status=0; \
	[ $$pkg2_status -ne 5 ] || pkg2_status=0; \
	[ $$status -ne 0 ] || status=$$pkg_status; [ $$status -ne 0 ] || status=$$pkg2_status

test: deps venv lint
	@if command -v cc >/dev/null 2>&1; then \
	    $(MAKE) compiled || exit $$?; \
	    export GBALANCE_EXPECT=compiled; $(SUITE); \
	    $(MAKE) pure; [ $$status -eq 0 ] || exit $$status; \
	    GBALANCE_EXPECT=pure $(VPY) -m pytest -m "not packaging" $(PYTEST_ARGS) $(PURE_TESTS); \
	else \
	    export GBALANCE_EXPECT=pure; $(SUITE); exit $$status; \
	fi

# Only the packaging tests: build the .deb and .rpm, install and drive the
# .deb in a throwaway root (nothing of the host changes), autopkgtests.
packaging: deps venv cython
	$(VPY) -m pytest -m packaging $(PYTEST_ARGS)

# debian/tests (autopkgtest, null runner) in a throwaway root; make test runs it too.
autopkgtest: deps venv
	$(VPY) -m pytest -m packaging -k autopkgtests $(PYTEST_ARGS)

# Only the fast in-process and loopback tests (no packaging).
unit: venv
	$(VPY) -m pytest -m "not packaging" $(PYTEST_ARGS)

bench: deps venv
	$(VPY) bench/run.py

# Mixed traffic against a real master for SOAK_SECONDS (default 180), then
# 9,000 idle connections (SOAK_SCALE); see bench/soak.py.
soak: venv
	$(VPY) bench/soak.py

deb:
	sh packaging/build-deb.sh

# The same package made by stdeb from setup.py and stdeb.cfg (command and man
# pages, no init script or units); see README, "Packages".
deb-stdeb:
	sh packaging/build-stdeb.sh

rpm:
	sh packaging/build-rpm.sh

apt-repo: deb
	sh packaging/build-apt-repo.sh

clean:
	find gbalance -name '*.so' -delete
	rm -rf $(VENV) build dist deb_dist *.egg-info .pytest_cache .mypy_cache .ruff_cache repo rpmbuild bench/results
