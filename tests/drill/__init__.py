"""The fault drill (issue 13, item 7) and the soak (item 9): `python -m tests.drill`, as root.

Continuous load through the mesh (short calls on new connections, long-lived streams) while a
fault happens in turn; what it cost is counted per phase. See tests/drill/drill.py."""
