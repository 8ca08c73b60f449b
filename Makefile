# Opt-in benchmarks (issue #5), never part of the default test run. setup.sh installs what is
# missing (HAProxy, nginx, wrk, matplotlib; sudo when not root), then runs `python -m tests.bench`.
#   make bench                  full run, bounded (about 10 minutes on 2 CPUs)
#   make bench-quick            the regression guard (under 2 minutes): run it before changing
#                               the data path; its last line says whether each target holds
#   make bench BENCH_ARGS="--out DIR"
BENCH_ARGS ?=

.PHONY: bench bench-quick
bench:
	./setup.sh bench $(BENCH_ARGS)

bench-quick:
	./setup.sh bench --quick $(BENCH_ARGS)

# The Vagrant testbed (issue: multi-host on real VMs): three Debian 12 VMs under libvirt, a box
# built from the Debian mirror, the scenarios of tests/e2e/test_multihost.py across them; the
# VMs are always destroyed. Installs Vagrant, libvirt and QEMU when missing.
#   make vagrant-test VAGRANT_ARGS="--vms 2"
VAGRANT_ARGS ?=

.PHONY: vagrant-test
vagrant-test:
	./setup.sh vagrant $(VAGRANT_ARGS)
