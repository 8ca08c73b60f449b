"""The Vagrant testbed: real Debian 12 VMs running meshnode, driven from the host
(`python -m tests.vagrant`, `make vagrant-test`). `guest.py` is the part that runs in the VMs."""
