"""One sweep at a time per experiment: a lock file holding the owner's pid and host.

``sweep.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local and NFS v3+ file systems). A lock whose
process is gone (same host, pid not alive) is stale - left by a driver killed with SIGKILL - and is taken
over; a live one refuses the second sweep with a line naming the owner.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from kdtune.errors import ConfigError
from kdtune.storage import pid_alive

LOCK_NAME = "sweep.lock"


class SweepLock:
    """``with SweepLock(experiment_dir): ...`` - refuses (ConfigError) while another live sweep holds it."""

    def __init__(self, experiment_dir: str | Path):
        self.path = Path(experiment_dir) / LOCK_NAME
        self.held = False
        self.took_over: dict | None = None

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": -1, "host": "?", "started": 0}

    def acquire(self) -> SweepLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released meanwhile
                same_host = owner.get("host") == me["host"]
                if same_host and owner.get("pid") == me["pid"]:
                    raise ConfigError(f"this process already runs a sweep on {self.path.parent}") from None
                if same_host and not pid_alive(int(owner.get("pid", -1))):
                    self.took_over = owner
                    self.path.unlink(missing_ok=True)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner.get("started", 0)))
                raise ConfigError(
                    f"experiment {self.path.parent.name} is being swept by pid {owner.get('pid')} on "
                    f"{owner.get('host')} (since {since}); wait for it to finish, or if that process is gone, "
                    f"delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ConfigError(f"cannot take the lock {self.path}; another sweep keeps taking it - retry")

    def release(self) -> None:
        if self.held:
            owner = self.owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> SweepLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
