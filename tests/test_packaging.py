"""The wheel is what gets deployed: it must work without the source tree.

Built from a copy of the sources (the checkout stays clean), inspected, then
installed into a fresh virtual environment and run from another directory,
offline: the wheel goes in with --no-index --no-deps, its dependencies come
from the environment running the tests (a .pth line, which adds the directory
but runs none of its .pth files, so the checkout's editable install stays out).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import __version__
from gateway.about import DEFAULT_FILES, PACKAGED_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "gateway", "telematics", "sim", "bench", "config")


def test_packaged_defaults_are_the_config_directory() -> None:
    """config/ is the copy to edit; gateway/defaults/ is what the wheel ships."""
    for name in DEFAULT_FILES:
        assert (PACKAGED_DEFAULTS / name).read_bytes() == (ROOT / "config" / name).read_bytes(), (
            f"gateway/defaults/{name} differs from config/{name}: "
            f"cp config/{name} gateway/defaults/{name}"
        )
    assert sorted(p.name for p in PACKAGED_DEFAULTS.iterdir()) == sorted(DEFAULT_FILES)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out)],
        check=True, capture_output=True, timeout=300,
    )
    (built,) = out.glob("*.whl")
    return built


def test_wheel_contents(wheel: Path) -> None:
    assert wheel.name == f"vehicle_privacy_gateway-{__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = f"vehicle_privacy_gateway-{__version__}.dist-info"
    assert top == {"gateway", "telematics", "sim", dist_info}
    assert not any(name.startswith(("bench/", "config/", "tests/")) for name in names)
    for name in DEFAULT_FILES:
        assert f"gateway/defaults/{name}" in names
    assert "gateway/py.typed" in names and "telematics/v1/streams_pb2.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "privacy-gateway = gateway.cli:main" in entry_points


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
         "--no-deps", "-q", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "zz_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    return venv


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory far from the checkout."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def run_installed(
    venv: Path, cwd: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(venv / "bin" / "python"), *args],
        cwd=cwd, env={**env, "COLUMNS": "100"}, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def test_installed_package_does_not_come_from_the_checkout(
    installed: Path, elsewhere: Path
) -> None:
    result = run_installed(
        installed, elsewhere, "-c",
        "import gateway, gateway.about as a, sim, telematics; "
        "print(gateway.__file__); print(a.DEFAULT_CONFIG); print(a.source_root())",
    )
    assert result.returncode == 0, result.stderr
    module, config, root = result.stdout.split()
    assert Path(module).is_relative_to(installed)
    assert Path(config).is_relative_to(installed)
    assert config.endswith("gateway/defaults/gateway.toml")
    assert root == "None"
    missing = run_installed(installed, elsewhere, "-c", "import bench")
    assert missing.returncode == 1 and "No module named 'bench'" in missing.stderr


def test_installed_cli_help_version_and_check_policy(installed: Path, elsewhere: Path) -> None:
    help_text = run_installed(installed, elsewhere, "-m", "gateway", "run", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "gateway/defaults/gateway.toml" in " ".join(help_text.stdout.split())
    version = subprocess.run(
        [str(installed / "bin" / "privacy-gateway"), "--version"],
        cwd=elsewhere, capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"vehicle-privacy-gateway {__version__}"
    policy = run_installed(
        installed, elsewhere, "-c",
        "import gateway.about as a, sys; from gateway.cli import main; "
        "sys.exit(main(['check-policy', str(a.DEFAULT_POLICY)]))",
    )
    assert policy.returncode == 0, policy.stderr
    assert "policy 2026.12.1" in policy.stdout and "is valid" in policy.stdout
    assert "tbox/connectivity" in policy.stdout


@pytest.fixture
def mosquitto() -> Iterator[str]:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed")
    from sim.broker import MosquittoBroker

    with MosquittoBroker() as broker:
        yield broker.url


@pytest.mark.integration
def test_installed_gateway_runs_on_its_default_config(
    installed: Path, elsewhere: Path, mosquitto: str
) -> None:
    """No --config: the packaged defaults (config and policy) are used; the state goes where
    --state-dir says, never into the installed package."""
    refused = run_installed(installed, elsewhere, "-m", "gateway", "run")
    assert refused.returncode == 2 and "give --state-dir DIR" in refused.stderr
    state = elsewhere / "state"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [str(installed / "bin" / "privacy-gateway"), "run", "--state-dir", str(state),
         "--vehicle-broker", mosquitto, "--backend-broker", mosquitto,
         "--control-listen", "127.0.0.1:0"],
        cwd=elsewhere, env={**env, "PYTHONUNBUFFERED": "1"},
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        for line in proc.stderr:
            lines.append(line)
            if "gateway ready" in line or time.monotonic() > deadline:
                break
        assert any("gateway ready: policy 2026.12.1" in line for line in lines), "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, "".join(lines) + (rest or "")
    assert (state / "pseudonym.key").exists() and (state / "consent.sqlite3").exists()
    site = installed / "lib"
    assert not [p for p in site.rglob("*") if p.name in ("pseudonym.key", "consent.sqlite3")]
