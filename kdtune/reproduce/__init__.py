"""Reproductions of published results that run on a CPU: each module has ``main(argv=None) -> int``.

- :mod:`kdtune.reproduce.disk_toys` -- DiSK's toy problems and its Table 1 (``kdtune reproduce disk-toys``).
"""

REPRODUCTIONS = {"disk-toys": "kdtune.reproduce.disk_toys"}
