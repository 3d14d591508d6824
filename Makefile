# Build, test and benchmark entry points of bpflb (BPF objects, Python environment, tests, lab demo).
.DELETE_ON_ERROR:
.PHONY: all bpf clean venv test test-unit test-bpf test-lab lint typecheck demo bench deps
.PHONY: chart bench-quick bpf-layout-test

CLANG ?= clang
ARCH_INCLUDE ?= /usr/include/$(shell uname -m)-linux-gnu
# -mcpu=v3: the SNAT pool claims a dead flow's port with an atomic compare-and-swap (natpool.h).
BPF_CFLAGS ?= -O2 -g -target bpf -mcpu=v3 -Wall -Wextra -Werror -Wno-unused-parameter \
	-I$(ARCH_INCLUDE) -Ibpf_objects/include
BPF_SRCS := $(wildcard bpf_objects/*.c)
BPF_OBJS := $(patsubst bpf_objects/%.c,bpf_objects/build/%.o,$(BPF_SRCS))
BPF_HDRS := $(wildcard bpf_objects/include/*.h)
VENV ?= .venv
PY := $(VENV)/bin/python
ifeq ($(V),1)
Q :=
else
Q := @
endif

all: bpf

bpf: $(BPF_OBJS)

bpf_objects/build/%.o: bpf_objects/%.c $(BPF_HDRS) | bpf_objects/build
	@echo "  CLANG-BPF $@"
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@

bpf_objects/build:
	$(Q)mkdir -p $@

# The agent's native helper, loaded with ctypes (bpflb.model.maglev): the Maglev table fill loop; and the
# rate benchmark's TCP client (bpflb.trafficgen), which a Python client could not drive fast enough.
NATIVE_LIBS := bpf_objects/build/libbpflb_maglev.so bpf_objects/build/bpflb-connstorm
NATIVE_CFLAGS ?= -O2 -Wall -Wextra -Werror -fPIC -shared

bpf: $(NATIVE_LIBS)

bpf_objects/build/libbpflb_maglev.so: native/maglev.c | bpf_objects/build
	@echo "  CC-SO     $@"
	$(Q)$(CC) $(NATIVE_CFLAGS) $< -o $@

bpf_objects/build/bpflb-connstorm: native/connstorm.c | bpf_objects/build
	@echo "  CC        $@"
	$(Q)$(CC) -O2 -Wall -Wextra -Werror -pthread $< -o $@
# The ClusterIP benchmark's connection client and server (bpflb_lab.bench_clusterip).
bpf: bpf_objects/build/connbench

bpf_objects/build/connbench: native/connbench.c | bpf_objects/build
	@echo "  CC        $@"
	$(Q)$(CC) -O2 -Wall -Wextra -Werror $< -o $@

# The upgrade tests' build (tests/bpf/test_migrate.py, tests/lab/test_upgrade.py): the same objects with another
# conntrack size and a field added to struct ct_entry, as a next release might have them, in a build dir of
# their own. An agent given BPFLB_BPF_DIR=$(LAYOUT_TEST_DIR) takes over the default build's pins, and back.
LAYOUT_TEST_DIR ?= bpf_objects/build-layout-test
LAYOUT_TEST_CFLAGS ?= -DCT_MAX=131072 -DBPFLB_LAYOUT_TEST
LAYOUT_TEST_OBJS := $(LAYOUT_TEST_DIR)/bpf_lb.o $(LAYOUT_TEST_DIR)/bpf_xdp.o $(LAYOUT_TEST_DIR)/bpf_sock.o

bpf-layout-test: $(LAYOUT_TEST_OBJS)

$(LAYOUT_TEST_DIR)/%.o: bpf_objects/%.c $(BPF_HDRS) | $(LAYOUT_TEST_DIR)
	@echo "  CLANG-BPF $@ ($(LAYOUT_TEST_CFLAGS))"
	$(Q)$(CLANG) $(BPF_CFLAGS) $(LAYOUT_TEST_CFLAGS) -c $< -o $@

$(LAYOUT_TEST_DIR):
	$(Q)mkdir -p $@

clean:
	rm -rf bpf_objects/build $(LAYOUT_TEST_DIR)

# System packages (Debian) and the Python virtualenv; both idempotent.
deps:
	$(Q)scripts/install-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(Q)python3 -m venv $(VENV)
	$(Q)$(VENV)/bin/pip install -q --upgrade pip
	$(Q)$(VENV)/bin/pip install -q -e '.[lab,test]'
	$(Q)touch $@

# The tests under mypy --strict too (pyproject's [tool.mypy]): every one of them, tests/bpf and
# tests/lab/test_conntrack_*.py included.
MYPY_TESTS := tests

# ruff, mypy --strict over both packages and the tests above, and the import contracts of .importlinter (the layers).
lint: venv
	$(Q)$(VENV)/bin/ruff check operator tests
	$(Q)$(VENV)/bin/mypy
	$(Q)$(VENV)/bin/mypy $(MYPY_TESTS)
	$(Q)cd operator && ../$(VENV)/bin/lint-imports --config ../.importlinter --no-cache

typecheck: lint

# The README's test command (after scripts/install-deps.sh): build, lint, every test.
test: venv bpf bpf-layout-test lint
	$(Q)$(VENV)/bin/pytest -v tests

test-unit: venv
	$(Q)$(VENV)/bin/pytest tests/unit

test-bpf: venv bpf bpf-layout-test
	$(Q)$(VENV)/bin/pytest tests/bpf

test-lab: venv bpf bpf-layout-test
	$(Q)$(VENV)/bin/pytest tests/lab

# The README's demo command (after scripts/install-deps.sh): build, bring the lab up, check it.
demo: venv bpf
	$(Q)$(VENV)/bin/bpflb lab down >/dev/null 2>&1 || true
	$(Q)$(VENV)/bin/bpflb lab up
	$(Q)$(VENV)/bin/bpflb lab status
	$(Q)$(VENV)/bin/bpflb lab check
	@echo "The lab keeps running: try '$(VENV)/bin/bpflb inspect --pin-root /sys/fs/bpf/bpflb-lab/bpflb/node1';"
	@echo "'$(VENV)/bin/bpflb lab down' removes it."

bench: venv bpf
	$(Q)$(VENV)/bin/bpflb bench

# CI's benchmark step (not a test): every benchmark in its quick form; fails only when a figure is missing.
bench-quick: venv bpf
	$(Q)scripts/bench-quick.sh

# The Helm chart, linted and packaged with Helm's own library into dist/ (the CRD link resolved).
chart: venv
	$(Q)$(PY) scripts/chart.py --out dist
