"""Where the gateway's own files are, and which release this is.

A source checkout keeps the editable default config in `config/`; an installed
wheel carries identical copies in `gateway/defaults/` (a test keeps them equal).
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from gateway import __version__

PROJECT_NAME = "vehicle-privacy-gateway"
PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_DEFAULTS = PACKAGE_DIR / "defaults"
DEFAULT_FILES = ("gateway.toml", "policy.yaml", "notice-map.yaml")


def is_project_root(directory: Path) -> bool:
    """True when `directory` holds this project's pyproject.toml."""
    try:
        data = tomllib.loads((directory / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    project = data.get("project")
    return isinstance(project, dict) and project.get("name") == PROJECT_NAME


def source_root() -> Path | None:
    """The checkout this package runs from, or None for an installed package."""
    root = PACKAGE_DIR.parent
    return root if is_project_root(root) else None


def default_config_dir() -> Path:
    """`config/` of the checkout when there is one, else the defaults shipped in the package."""
    root = source_root()
    if root is not None and all((root / "config" / name).is_file() for name in DEFAULT_FILES):
        return root / "config"
    return PACKAGED_DEFAULTS


DEFAULT_CONFIG = default_config_dir() / "gateway.toml"
DEFAULT_POLICY = default_config_dir() / "policy.yaml"


def is_packaged_default(config_path: Path) -> bool:
    return config_path.resolve().parent == PACKAGED_DEFAULTS


def enclosing_repository(path: Path) -> Path | None:
    """The nearest directory at or above `path` that is a repository work tree (it holds
    `.git`) or this project's source tree (its pyproject.toml); None outside both."""
    path = path.resolve()
    for directory in (path, *path.parents):
        if (directory / ".git").exists() or is_project_root(directory):
            return directory
    return None


def commit() -> str | None:
    """The checkout's commit (short hash, `+modified` when the tree differs), if known."""
    root = source_root()
    if root is None or not (root / ".git").exists():
        return None

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return head + ("+modified" if status else "")


def version_text() -> str:
    sha = commit()
    return f"{PROJECT_NAME} {__version__}" + (f" (commit {sha})" if sha else "")
