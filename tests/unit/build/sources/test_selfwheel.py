from __future__ import annotations

import zipfile
from pathlib import Path

import airgap
from airgap.build.sources.selfwheel import build_self_wheel, runtime_requirements


def test_self_wheel_is_reproducible_and_complete(tmp_path: Path) -> None:
    one = build_self_wheel(tmp_path / "a")
    two = build_self_wheel(tmp_path / "b")
    assert one.read_bytes() == two.read_bytes()
    assert one.name == f"airgap-{airgap.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(one) as wheel:
        names = wheel.namelist()
        assert "airgap/cli.py" in names and "airgap/py.typed" in names
        assert not any("__pycache__" in n for n in names)
        record = wheel.read(f"airgap-{airgap.__version__}.dist-info/RECORD").decode()
        entry_points = wheel.read(f"airgap-{airgap.__version__}.dist-info/entry_points.txt").decode()
    assert "airgap/bundle/container.py,sha256=" in record
    assert "airgap = airgap.cli:main" in entry_points


def test_runtime_requirements_exclude_extras() -> None:
    requirements = runtime_requirements()
    assert any(r.startswith("cryptography") for r in requirements)
    assert not any("huggingface" in r or "pytest" in r for r in requirements)
