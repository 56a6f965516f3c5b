"""Tracking URIs: normalise them, find the embedded SQLite file, and check them before a sweep starts.

A sweep's embedded default is ``sqlite:///<storage>/<experiment>/mlflow.db`` with the artifacts beside it.
Ray runs every trial with its trial directory as working directory, so a relative ``sqlite:///mlflow.db``
would land in each trial's folder: :func:`normalize_tracking_uri` makes SQLite and plain-path URIs absolute
in the driver, before the URI is handed to the trials. Nothing here imports MLflow.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from kdtune.errors import ConfigError

SERVER_SCHEMES = ("http", "https")
HEALTH_TIMEOUT_S = 3.0


def default_tracking_uri(experiment_dir: str | os.PathLike) -> str:
    """The embedded default of a sweep: ``sqlite:///<experiment_dir>/mlflow.db`` (absolute)."""
    return "sqlite:///" + str(Path(experiment_dir).expanduser().absolute() / "mlflow.db")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other schemes and in-memory databases)."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:") :]
    if not rest.startswith("///"):
        return None  # sqlite:// is an in-memory database
    path = rest[3:].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def normalize_tracking_uri(uri: str | None) -> str | None:
    """Make SQLite and plain-path URIs absolute (trials run in their own directories); others unchanged."""
    if uri is None:
        return None
    uri = str(uri).strip()
    path = sqlite_path(uri)
    if path is not None:
        query = uri.split("?", 1)[1] if "?" in uri else ""
        out = "sqlite:///" + str(path.expanduser().absolute())
        return out + (f"?{query}" if query else "")
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return Path(uri).expanduser().absolute().as_uri()
    return uri


def _check_writable_dir(directory: Path, uri: str) -> None:
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"tracking URI {uri}: {probe} is not a directory; choose another storage path or tracking_uri"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"tracking URI {uri}: directory {probe} is not writable; choose a writable storage path or "
            "tracking_uri"
        )


def _check_server(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    hint = (
        "start it (`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`) "
        "or leave tracking_uri unset to use the embedded SQLite file"
    )
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as resp:  # noqa: S310 (http/https only)
            if resp.status == 200:
                return
            code = resp.status
    except urllib.error.HTTPError as e:
        code = e.code
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"MLflow tracking server {uri} is unreachable ({reason}); {hint}") from None
    if code in (401, 403):
        raise ConfigError(
            f"MLflow tracking server {uri} refused the credentials (HTTP {code}); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    raise ConfigError(
        f"{uri} answered HTTP {code} at /health: it does not look like an MLflow tracking server; "
        "check the tracking_uri"
    )


def check_tracking_uri(uri: str | None) -> None:
    """Refuse a tracking URI that cannot work, in one line with the fix, before any trial runs.

    ``http(s)://``: the server's ``/health`` must answer within a few seconds. ``sqlite:///``: the database's
    directory must be creatable and writable (an existing file writable). ``file://`` or a plain path: MLflow
    3.17 refuses the file store unless ``MLFLOW_ALLOW_FILE_STORE=true``. Other schemes (databricks,
    postgresql, ...) are left to MLflow.
    """
    if uri is None or str(uri).strip() == "":
        return
    uri = str(uri).strip()
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in SERVER_SCHEMES:
        _check_server(uri)
        return
    if scheme == "sqlite":
        path = sqlite_path(normalize_tracking_uri(uri) or uri)
        if path is None:
            return
        if path.exists():
            if path.is_dir():
                raise ConfigError(f"tracking URI {uri}: {path} is a directory, not a database file")
            if not os.access(path, os.R_OK | os.W_OK):
                raise ConfigError(f"tracking URI {uri}: {path} is not writable; fix its permissions")
            return
        _check_writable_dir(path.parent, uri)
        return
    if scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true", "yes"):
            raise ConfigError(
                f"tracking URI {uri} is an MLflow file store, which MLflow 3.17 refuses; use "
                "sqlite:///<dir>/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)"
            )
        local = urllib.parse.urlparse(uri).path if scheme == "file" else uri
        _check_writable_dir(Path(urllib.parse.unquote(local)).expanduser(), uri)
