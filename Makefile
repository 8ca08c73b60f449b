# Opt-in benchmarks (issue #5), never part of the default test run. setup.sh installs what is
# missing (HAProxy, nginx, wrk, h2load, matplotlib; sudo when not root), then runs `python -m tests.bench`.
#   make bench                  full run, bounded (about 10 minutes on 2 CPUs)
#   make bench-quick            the regression guard (under 2 minutes): run it before changing
#                               the data path; its "targets:" lines say whether each holds
#   (both end with mTLS between two hosts, tests/bench/tunnel.py: meshnode plaintext and mTLS
#   against HAProxy mTLS; alone: python -m tests.bench.tunnel [--quick]; then HTTP/1.1 with
#   wrk and h2 with h2load through meshnode L7, HAProxy mode http and nginx proxy_pass:
#   tests/bench/http.py, alone: python -m tests.bench.http [--quick]; then the ingress gateway:
#   TLS 1.3 termination + routing by path to 2 backends, meshnode's Gateway against HAProxy and
#   nginx: tests/bench/gateway.py, alone: python -m tests.bench.gateway [--quick]; then the
#   kernel fast path (datapath: kernel) against the proxy path (now and before), direct and
#   HAProxy, with redis-benchmark, pgbench and h2load by name: tests/bench/kernel.py, alone:
#   python -m tests.bench.kernel [--quick])
#   make bench BENCH_ARGS="--out DIR"
#   make bench-scale            what one change costs with 10 000 services of 4 endpoints
#                               (tests/bench/scale.py; a few minutes on 2 CPUs);
#                               SCALE_ARGS="--services 1000" for a quick run
#   make bench-scale-fabric     the same on three hosts sharing etcd (tests/bench/scale_fabric.py)
BENCH_ARGS ?=
SCALE_ARGS ?=

.PHONY: bench bench-quick bench-scale bench-scale-fabric
bench:
	./setup.sh bench $(BENCH_ARGS)

bench-quick:
	./setup.sh bench --quick $(BENCH_ARGS)

bench-scale:
	./setup.sh bench scale $(SCALE_ARGS)

bench-scale-fabric:
	./setup.sh bench scale-fabric $(SCALE_ARGS)

# The Vagrant testbed (issue: multi-host on real VMs): three Debian 12 VMs under libvirt, a box
# built from the Debian mirror, the scenarios of tests/e2e/test_multihost.py across them; the
# VMs are always destroyed. Installs Vagrant, libvirt and QEMU when missing.
#   make vagrant-test VAGRANT_ARGS="--vms 2"
VAGRANT_ARGS ?=

.PHONY: vagrant-test
vagrant-test:
	./setup.sh vagrant $(VAGRANT_ARGS)

# The fault drill and the soak (issue 13; tests/drill/): continuous load through the mesh (short
# calls on new connections, long-lived streams) on both capture backends while each fault
# happens in turn (agent restart, SIGKILL, upgrade, worker and backend kills, etcd faults); a
# table per phase with its target, written to artifacts/drill/. Exits 1 when a target is missed.
#   make drill DRILL_ARGS="--quick"                        short phases (what CI runs)
#   make drill DRILL_ARGS="--backend ebpf --only restart,upgrade"
#   make soak SOAK_ARGS="--minutes 2"                      at most 10 minutes (the default)
DRILL_ARGS ?=
SOAK_ARGS ?=

.PHONY: drill soak
drill:
	./setup.sh drill $(DRILL_ARGS)

soak:
	./setup.sh soak $(SOAK_ARGS)
