"""meshnode.diagnose: what the CLI asks of a host before (and besides) running the agent.

`doctor.py` probes for real whatever the agent needs (root, cgroup v2, a capture backend).
The CLI runs it; the agent never imports this package. It may import host, bpf, capture and
agent.client; nothing under meshnode imports it (which keeps `host/` a leaf).
"""
