# The two commands of the README. Each installs what it needs first (idempotent).
PYTHON ?= python3

.PHONY: install test bench test-sanitize

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m marginkit bench

# The compiled-op tests against a CPU-only marginkit._C built with AddressSanitizer +
# UndefinedBehaviorSanitizer, halting on the first report. Own build folder and a staged copy
# of the package (build/sanitize/stage): the normal editable build is never touched.
SANITIZE_DIR := $(CURDIR)/build/sanitize
SANITIZE_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
test-sanitize: install
	MARGINKIT_NO_CUDA=1 cmake -S . -B $(SANITIZE_DIR)/cmake -G Ninja -DMARGINKIT_CUDA=OFF \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE=$$(command -v $(PYTHON)) \
	  -Dpybind11_DIR=$$($(PYTHON) -m pybind11 --cmakedir) -DMARGINKIT_OUTPUT_DIR=$(SANITIZE_DIR)/lib \
	  -DCMAKE_CXX_FLAGS="$(SANITIZE_FLAGS)" -DCMAKE_MODULE_LINKER_FLAGS="$(SANITIZE_FLAGS)" \
	  -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF
	cmake --build $(SANITIZE_DIR)/cmake --parallel $${MAX_JOBS:-$$(nproc)}
	rm -rf $(SANITIZE_DIR)/stage && mkdir -p $(SANITIZE_DIR)/stage
	cp -r marginkit tests pytest.ini $(SANITIZE_DIR)/stage/
	cp -r triton_kernels $(SANITIZE_DIR)/stage/marginkit/triton_kernels
	rm -f $(SANITIZE_DIR)/stage/marginkit/_C*.so && cp $(SANITIZE_DIR)/lib/_C*.so $(SANITIZE_DIR)/stage/marginkit/
	cd $(SANITIZE_DIR)/stage && \
	  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=halt_on_error=1:detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 MARGINKIT_NO_CUDA=1 \
	  $(PYTHON) -m pytest -q -p no:cacheprovider --capture=sys tests/ops
