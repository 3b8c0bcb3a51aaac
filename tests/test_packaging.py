"""`pip install .` (not editable) must ship the YAML libraries and the metric modules."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    return next(out.glob("peftkit-*.whl"))


def test_wheel_ships_libraries_and_metrics(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("adapters", "prompts", "recipes"):
        shipped = {n for n in names if n.startswith(f"peftkit/library/{kind}/")}
        on_disk = {p.name for p in (ROOT / kind).glob("*.yaml")}
        assert on_disk, kind
        assert {Path(n).name for n in shipped} == on_disk, kind
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "peftkit").rglob("*.py")}
    assert "peftkit/prompting/scorers/causal.py" in sources
    missing = sources - names  # a subpackage left out of [tool.setuptools] packages
    assert not missing, sorted(missing)
    for metric in ("accuracy", "f1", "precision", "recall"):
        assert f"peftkit/metrics/{metric}/{metric}.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_package_finds_its_libraries(wheel, tmp_path):
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    code = (
        "import peftkit.config.library as lib, peftkit.config.presets as a; "
        "print(lib.library_dir('adapters')); print(a.available_presets())"
    )
    # -S: skip .pth files, so the checkout's editable install cannot shadow the wheel.
    import sysconfig

    path = f"{target}:{sysconfig.get_paths()['purelib']}"
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": path},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(target / "peftkit" / "library" / "adapters") in out
    assert "'lora'" in out and "'qlora'" in out
