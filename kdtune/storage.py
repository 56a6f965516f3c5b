"""Stage artifacts on shared storage: atomic writes, sha256 manifests, and a build-once protocol.

A sweep's stages (a teacher to train, the CE-trained student that DiSK starts from) are artifacts keyed by a
hash of what defines them, asked for by many trials on many nodes at once, on a POSIX filesystem shared by
every node (NFSv3+ or any local filesystem; object stores have no exclusive create):

- each is built exactly once: a builder holds ``<root>/<key>.lock`` (``O_CREAT|O_EXCL``, touched every
  ``heartbeat_s``); a stale lock (owner gone, or mtime still for ``stale_after_s``) is broken and competed
  for;
- nobody reads half of one: ``<root>/<key>/`` appears in one ``rename``, its ``kdtune-manifest.json`` (sha256
  and size of every file) verified before use; a builder that lost its lock drops its work; a published
  directory is never replaced, except a corrupt one (``on_corrupt="rebuild"``, or ``"raise"``).

``build_once(root, key, build_fn) -> Path`` is the whole API a stage cache needs; ``atomic_write`` and
``atomic_write_bytes`` give the same all-or-nothing guarantee to single files. More: docs/storage.md.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from kdtune.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MANIFEST = "kdtune-manifest.json"
MANIFEST_FORMAT = 1
LOCK_SUFFIX = ".lock"
BREAK_SUFFIX = ".lock.break"
TMP_PREFIX = ".tmp-"
CORRUPT_INFIX = ".corrupt-"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_CHUNK = 1 << 20
BREAK_LOCK_STALE_S = 30.0  # a breaker holds its lock for milliseconds; older than this, its owner died


# ---------------------------------------------------------------------------------------------------------
# single files


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", durable: bool = True) -> Iterator[IO[Any]]:
    """Write ``path`` all or nothing: a temporary file beside it, fsync, then ``os.replace``.

    Readers see the old file or the new one, never a partial one. If the block raises, the temporary file is
    removed and ``path`` is left as it was. ``durable=False`` skips the two fsyncs: still all or nothing when
    a process is killed, not across a power loss (for small files rewritten every epoch, where the fsyncs
    would cost more than the write).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}")
    f = open(tmp, mode)  # noqa: SIM115 (closed below, before the rename)
    try:
        yield f
        f.flush()
        if durable:
            os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):  # a full disk refuses the close's flush too: the error is the first one
            f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, RuntimeError) and _nearly_full(path.parent):
            # torch.save's C++ writer says only "unexpected pos 64 vs 0" when a write fails: name the cause
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def _nearly_full(folder: Path, below: int = 8 << 20) -> bool:
    """Whether the file system holding ``folder`` has less than ``below`` bytes left."""
    try:
        return shutil.disk_usage(folder).free < below
    except OSError:
        return False


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); return the path."""
    with atomic_write(path, "wb", durable=durable) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# manifests


def _artifact_files(directory: Path) -> list[str]:
    out = []
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append(p.relative_to(directory).as_posix())
    return out


def write_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Record the sha256 and size of every file under ``directory`` in its ``kdtune-manifest.json``."""
    directory = Path(directory)
    files = {
        rel: {"sha256": sha256_file(directory / rel), "size": (directory / rel).stat().st_size}
        for rel in _artifact_files(directory)
    }
    manifest = {"format": MANIFEST_FORMAT, "created": time.time(), "files": files}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Check every file of an artifact against its manifest; raise :class:`CheckpointError` (one line) if not.

    Files missing, added, resized or with another sha256 all count as corruption.
    """
    directory = Path(directory)
    mpath = directory / MANIFEST
    fix = f"remove {directory} to rebuild it"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"artifact {directory} has no {MANIFEST} (incomplete copy?); {fix}") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"artifact {directory}: {MANIFEST} is unreadable; {fix}") from None
    present = set(_artifact_files(directory))
    missing = sorted(set(files) - present)
    if missing:
        raise CheckpointError(f"artifact {directory} is missing {', '.join(missing)}; {fix}")
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointError(
            f"artifact {directory} holds files not in its manifest ({', '.join(extra)}); {fix}"
        )
    for rel, meta in files.items():
        p = directory / rel
        if p.stat().st_size != meta["size"]:
            raise CheckpointError(
                f"artifact {directory}: {rel} has {p.stat().st_size} bytes, the manifest says {meta['size']}; {fix}"
            )
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            raise CheckpointError(
                f"artifact {directory}: checksum mismatch in {rel} (sha256 {digest[:12]}..., manifest "
                f"{meta['sha256'][:12]}...); {fix}"
            )
    return manifest


# ---------------------------------------------------------------------------------------------------------
# who holds a lock


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (``None`` where /proc is absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields start after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def owner_info() -> dict[str, Any]:
    """What a lock records about the process that holds it."""
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "start": _proc_start(pid),
        "token": uuid.uuid4().hex,
        "created": time.time(),
    }


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of an append-only JSON-lines file, oldest first; a line a kill cut short is skipped, a
    missing file is empty."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except ValueError:
            pass
    return out


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is no zombie (killed, not yet reaped: dead for us)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return _proc_state(pid) != "Z"


def owner_is_dead(info: dict[str, Any]) -> bool:
    """True when the lock's owner ran on this machine and that process no longer exists.

    Another machine's owner cannot be checked: staleness there is judged from the lock's heartbeat.
    """
    if info.get("host") != socket.gethostname() or info.get("boot_id", "") != _boot_id():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    if not pid_alive(pid):
        return True
    start = info.get("start")
    now_start = _proc_start(pid)
    return start is not None and now_start is not None and start != now_start  # the pid was reused


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _create_exclusive(path: Path, info: dict[str, Any]) -> bool:
    """Create ``path`` holding ``info`` only if it does not exist; True when this call created it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


class _Heartbeat(threading.Thread):
    """Touch the lock file (and the work directory) every ``interval`` seconds while a build runs."""

    def __init__(self, paths: list[Path], interval: float):
        super().__init__(name=f"kdtune-heartbeat-{paths[0].name}", daemon=True)
        self.paths = paths
        self.interval = interval
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            for p in self.paths:
                with contextlib.suppress(OSError):
                    os.utime(p, None)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


class _StaleWatch:
    """A waiter's view of one lock: stale once its owner is dead or its mtime stood still long enough."""

    def __init__(self, stale_after_s: float):
        self.stale_after_s = stale_after_s
        self.seen: tuple[str | None, int] | None = None
        self.since = 0.0

    def check(self, lock: Path) -> tuple[bool, dict[str, Any] | None]:
        info = _read_json(lock)
        try:
            mtime = lock.stat().st_mtime_ns
        except FileNotFoundError:
            return False, None
        if info is None:
            # being written this instant, or its writer died between create and write: judge by mtime only
            info = {}
        if info and owner_is_dead(info):
            return True, info
        state = (info.get("token"), mtime)
        now = time.monotonic()
        if state != self.seen:
            self.seen, self.since = state, now
            return False, info
        return now - self.since >= self.stale_after_s, info


def _break_lock(lock: Path, token: str | None) -> bool:
    """Remove a stale ``lock`` if it still holds ``token``; serialised by a short break lock."""
    brk = lock.with_name(lock.name[: -len(LOCK_SUFFIX)] + BREAK_SUFFIX)
    if not _create_exclusive(brk, owner_info()):
        try:
            age = time.time() - brk.stat().st_mtime
        except FileNotFoundError:
            return False
        binfo = _read_json(brk) or {}
        if age > BREAK_LOCK_STALE_S or (binfo and owner_is_dead(binfo)):
            with contextlib.suppress(FileNotFoundError):
                brk.unlink()
        return False
    try:
        info = _read_json(lock)
        if info is None and lock.exists():
            info = {}
        if info is None or info.get("token") != token:
            return False  # gone, or replaced by a live owner since we judged it
        lock.unlink()
        log.warning(
            "took over the stale lock %s of pid %s on %s", lock, info.get("pid", "?"), info.get("host", "?")
        )
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            brk.unlink()


# ---------------------------------------------------------------------------------------------------------
# build once


def check_key(key: str) -> str:
    """A stage key must be one safe path component (letters, digits, ``._-``; no leading dot)."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or key.endswith(LOCK_SUFFIX):
        raise ConfigError(
            f"artifact key {key!r} is not a safe file name; use letters, digits, '.', '_' and '-' "
            "(at most 200 characters, not starting with '.')"
        )
    return key


def check_root(root: str | os.PathLike) -> Path:
    """The artifact root must be a filesystem path (shared by every node): object-store URIs are refused."""
    s = str(root)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", s):
        raise ConfigError(
            f"stage storage {s} is a URI; stage artifacts need a filesystem path shared by every node "
            "(an NFS mount), with exclusive file creation"
        )
    return Path(s).expanduser().absolute()


def artifact_path(root: str | os.PathLike, key: str) -> Path:
    """Where the finished artifact ``key`` lives (whether or not it exists yet)."""
    return check_root(root) / check_key(key)


def _publish(tmp: Path, final: Path) -> bool:
    """Rename the finished ``tmp`` directory to ``final``; False if ``final`` exists already."""
    try:
        os.rename(tmp, final)
    except OSError as e:
        if final.exists():
            return False
        raise CheckpointError(
            f"cannot publish {tmp} as {final} ({e.strerror}); check the storage path"
        ) from e
    _fsync_dir(final.parent)
    return True


def _still_ours(lock: Path, token: str) -> bool:
    info = _read_json(lock)
    return info is not None and info.get("token") == token


def build_once(
    root: str | os.PathLike,
    key: str,
    build_fn: Callable[[Path], Any],
    *,
    on_corrupt: str = "rebuild",
    poll_s: float = 0.5,
    heartbeat_s: float = 15.0,
    stale_after_s: float = 300.0,
    timeout_s: float | None = None,
    verify: bool = True,
) -> Path:
    """Return the directory of artifact ``key`` under ``root``, building it with ``build_fn`` at most once.

    ``build_fn(work_dir)`` writes the artifact's files into ``work_dir`` (an empty directory on the same
    filesystem); its return value is ignored. Exactly one caller among all processes and nodes that share
    ``root`` runs it; the others wait (polling every ``poll_s`` seconds) and get the same path. The result is
    verified against its sha256 manifest on every call (``verify=False`` skips that). A corrupt artifact is
    moved aside and rebuilt (``on_corrupt="rebuild"``) or refused with a :class:`CheckpointError`
    (``"raise"``). A builder that dies leaves a lock that others take over (see the module docstring); if
    ``build_fn`` raises, the lock is released and the error propagates, so the next caller builds again.
    ``timeout_s`` bounds the wait for another builder (``None``: wait as long as its heartbeat goes on).
    """
    if on_corrupt not in ("rebuild", "raise"):
        raise ConfigError(f"on_corrupt={on_corrupt!r}; use 'rebuild' or 'raise'")
    if not (0 < heartbeat_s < stale_after_s):
        raise ConfigError(
            f"heartbeat_s={heartbeat_s} must be positive and below stale_after_s={stale_after_s}"
        )
    final = artifact_path(root, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.with_name(key + LOCK_SUFFIX)
    watch = _StaleWatch(stale_after_s)
    t0 = time.monotonic()
    waited_logged = False
    while True:
        if final.exists():
            if not verify:
                return final
            try:
                verify_manifest(final)
                return final
            except CheckpointError as err:
                if on_corrupt == "raise":
                    raise
                corrupt_reason = str(err)
        else:
            corrupt_reason = None

        me = owner_info()
        if _create_exclusive(lock, me):
            try:
                built = _build_locked(final, lock, me, build_fn, corrupt_reason, heartbeat_s, stale_after_s)
            finally:
                if _still_ours(lock, me["token"]):
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
            if built:
                continue  # verify what is now published, as every reader does
            watch = _StaleWatch(stale_after_s)  # lost the lock meanwhile: wait for the new holder

        stale, info = watch.check(lock)
        if stale:
            _break_lock(lock, (info or {}).get("token"))
            continue
        if not waited_logged and info:
            log.info("waiting for %s, being built by pid %s on %s", final, info.get("pid"), info.get("host"))
            waited_logged = True
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            who = f"pid {info.get('pid')} on {info.get('host')}" if info else "another process"
            raise CheckpointError(
                f"waited {timeout_s:.0f} s for {final}, being built by {who}; if that process is hung, "
                f"stop it or remove {lock}"
            )
        time.sleep(poll_s * (0.75 + 0.5 * random.random()))


def _build_locked(
    final: Path,
    lock: Path,
    me: dict[str, Any],
    build_fn: Callable[[Path], Any],
    corrupt_reason: str | None,
    heartbeat_s: float,
    stale_after_s: float,
) -> bool:
    """Holding the lock: move a corrupt artifact aside, build into a temporary directory, publish it.

    True when ``final`` is now published (by us or by the previous holder); False when we lost the lock while
    building and dropped our work.
    """
    token = me["token"]
    if final.exists():
        if corrupt_reason is None:
            return True  # finished by the previous holder between our check and our lock
        try:
            verify_manifest(final)
            return True  # rebuilt by the previous holder meanwhile
        except CheckpointError:
            aside = final.with_name(f"{final.name}{CORRUPT_INFIX}{token[:8]}")
            os.rename(final, aside)
            log.warning("%s; moved it to %s and rebuilding", corrupt_reason, aside)
    _clean_orphans(final, stale_after_s)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}-{token}")
    tmp.mkdir()
    beat = _Heartbeat([lock, tmp], heartbeat_s)
    beat.start()
    try:
        build_fn(tmp)
        write_manifest(tmp)
        if not _still_ours(lock, token):
            # judged stale and taken over while we built: the new holder publishes, not us
            log.warning("lost the lock %s while building; dropping this build", lock)
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        if not _publish(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        beat.stop()


def _clean_orphans(final: Path, stale_after_s: float) -> None:
    """Remove work directories of ``final`` whose builder died (no heartbeat for ``stale_after_s``)."""
    now = time.time()
    for p in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        with contextlib.suppress(OSError):
            if p.is_dir() and now - p.stat().st_mtime > stale_after_s:
                shutil.rmtree(p, ignore_errors=True)


def status(root: str | os.PathLike, key: str) -> str:
    """One word for artifact ``key``: ``ready``, ``building`` (locked) or ``missing`` (unverified)."""
    final = artifact_path(root, key)
    if final.exists() and (final / MANIFEST).exists():
        return "ready"
    if final.with_name(key + LOCK_SUFFIX).exists():
        return "building"
    return "missing"
