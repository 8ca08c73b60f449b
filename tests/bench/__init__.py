"""The benchmark suite (issue #5): meshnode's cost against a direct connection, HAProxy and nginx,
as ratios measured in the same run. Opt-in: `make bench`, `make bench-quick` or
`sudo .venv/bin/python -m tests.bench [--quick]`; never collected by pytest (no test_ files, and
outside the configured testpaths)."""
