"""Keep private keys out of the Flower App Bundle.

``flwr run APP`` packs the app directory into a bundle (FAB) that travels to the
SuperLink and from there to every node: in Flower 1.41/1.42 every ``*.py``,
``*.toml``, ``*.md``, ``*.json``, ``*.yaml`` file under the app that the app root's
``.gitignore`` does not ignore (``flwr.cli.build.build_fab_from_disk``). A key pair
made inside the app (``paillier.key.json``) would therefore reach the server.
So ``fedapp keygen`` refuses to write inside an app (:func:`app_root_of`), the
project's ``.gitignore`` ignores key files, and ``fedapp sim``/``fedapp run`` (and
the deployment script) refuse to submit an app directory holding private key
material (:func:`check_app`), naming the file.

Flower lists every file under the app before it filters them, a virtual environment
inside the app included (48,774 files for ours: 7-10 s of CPU per ``flwr run``), so
our commands submit a staged copy of what the bundle can take (:func:`stage_app`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pathspec

# Directories no bundle takes files from (Flower's own exclusions) and that hold
# many files: a virtual environment, git's objects.
_SKIP_DIRS = {".git", ".venv", "venv", "env", "__pycache__", "node_modules", ".hypothesis",
              ".pytest_cache", ".mypy_cache", ".ruff_cache"}
_PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_SECRET_TYPES = ("paillier-private-key", "fedapp-threshold-paillier-key-share",
                 "fedapp-paillier-group-key")
_MAX_SCAN_BYTES = 1 << 20
# What Flower's bundle builder takes (flwr.common.constant.FAB_INCLUDE_PATTERNS, 1.42),
# and the files it reads its rules from; it filters the staged copy again itself.
_BUNDLE_SUFFIXES = {".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl"}
_BUNDLE_NAMES = {"LICENSE", ".gitignore"}


def is_flower_app(directory: Path) -> bool:
    """Whether ``directory`` holds a Flower app's ``pyproject.toml`` (``[tool.flwr.app]``)."""
    pyproject = directory / "pyproject.toml"
    try:
        return pyproject.is_file() and "[tool.flwr.app" in pyproject.read_text(errors="ignore")
    except OSError:
        return False


def app_root_of(path: Path) -> Path | None:
    """The Flower app directory that ``path`` lies in (itself or an ancestor), or None."""
    path = path.expanduser().resolve()
    for directory in (path, *path.parents):
        if is_flower_app(directory):
            return directory
    return None


def refuse_inside_app(directory: Path, what: str) -> None:
    """Refuse to write ``what`` (private key material) inside a Flower app.

    Raises
    ------
    ValueError
        Naming the app and the default key directory to use instead.
    """
    app = app_root_of(directory)
    if app is not None:
        raise ValueError(
            f"{directory} is inside the Flower app {app}: 'flwr run' packs the app's files "
            f"into the bundle it uploads to the server, so {what} must live elsewhere. Leave "
            "out --out (keys go to $FEDAPP_KEY_DIR or ~/.fedapp/keys), or pass "
            "--allow-inside-app if you know the file is ignored")


def holds_private_key(data: bytes) -> bool:
    """Whether ``data`` (a file's content) is private key material we know: a PEM or
    OpenSSH private key (TLS, SuperNode keys, masking identity keys), a Paillier
    private key, a threshold Paillier key share or the clients' group key."""
    if _PEM_PRIVATE.search(data):
        return True
    if data.lstrip().startswith(b"{") and any(t.encode() in data for t in _SECRET_TYPES):
        try:
            found = json.loads(data)
        except (ValueError, RecursionError):
            return False
        return isinstance(found, dict) and found.get("type") in _SECRET_TYPES
    return False


def _file_holds_private_key(path: Path) -> bool:
    try:
        return path.stat().st_size <= _MAX_SCAN_BYTES and holds_private_key(path.read_bytes())
    except OSError:
        return False


def private_material(app_dir: Path) -> list[Path]:
    """Files under ``app_dir`` that hold private key material (virtual environments
    and git's own directory aside, which no bundle takes files from)."""
    found = []
    for root, dirs, files in os.walk(app_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".venv")
                         and not d.endswith(".egg-info"))
        found += [Path(root) / f for f in sorted(files)
                  if _file_holds_private_key(Path(root) / f)]
    return found


def check_app(app_dir: Path) -> None:
    """Refuse to submit ``app_dir`` unless it is a Flower app free of private key material.

    Raises
    ------
    ValueError
        If it holds no Flower app, or naming every file with private key material and
        where keys belong instead.
    """
    if not is_flower_app(app_dir):
        raise ValueError(f"{app_dir} holds no Flower app (a pyproject.toml with "
                         "[tool.flwr.app]): run from the app's directory or pass --app DIR")
    found = private_material(app_dir)
    if found:
        names = ", ".join(str(p) for p in found)
        raise ValueError(
            f"the app directory {app_dir} holds private key material ({names}): 'flwr run' "
            "would pack it into the bundle it uploads to the server. Move these files out of "
            "the app (keys belong in $FEDAPP_KEY_DIR or ~/.fedapp/keys) and submit again")


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy into ``dest`` the files of ``app_dir`` that Flower's bundle builder can take.

    Directories the app's ``.gitignore`` ignores (a virtual environment, key folders)
    and git's own are not entered, as git does not; of the rest, files of the types a
    bundle holds are copied, with the app's ``.gitignore``, so that ``flwr run dest``
    applies Flower's own rules to them and builds the bundle ``flwr run app_dir``
    would, without listing the ignored directories first.

    Returns
    -------
    Path
        ``dest``.
    """
    gitignore = app_dir / ".gitignore"
    rules = pathspec.PathSpec.from_lines(
        "gitwildmatch", gitignore.read_text().splitlines() if gitignore.is_file() else [])
    for root, dirs, files in os.walk(app_dir):
        here = Path(root).relative_to(app_dir)
        dirs[:] = [d for d in dirs if d not in (".git", "__pycache__")
                   and not rules.match_file(f"{(here / d).as_posix()}/")]
        for name in files:
            source = Path(root) / name
            if (source.suffix in _BUNDLE_SUFFIXES or name in _BUNDLE_NAMES) \
                    and not source.is_symlink():
                (dest / here).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dest / here / name)
    return dest
