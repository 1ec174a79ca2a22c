"""Wheels through pypa/installer into a venv without pip: what is installed, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from airgap.errors import FormatError, InstallError
from airgap.prefix.wheelinstall import (
    WheelToInstall,
    check_installed,
    check_venv_records,
    examine_wheel,
    install_wheels,
    site_packages,
)
from tests.support import write_sdist, write_wheel


def wheel(path: Path, name: str | None = None, version: str | None = None) -> WheelToInstall:
    file_name, file_version = path.name.split("-")[:2]
    return WheelToInstall(path, path.name, name or file_name, version or file_version)


def test_installs_files_and_scripts_without_pip_and_checks_what_is_there(tmp_path: Path) -> None:
    good = write_wheel(tmp_path / "w", "tool", "1.2", {"tool/__init__.py": b"def main():\n    print('hi')\n",
                                                        "tool-extra.pth": b"import tool\n"},
                       entry_points="[console_scripts]\ntool = tool:main\n")
    venv = tmp_path / "venv"
    contents = install_wheels(venv, [wheel(good)])
    assert contents[0].scripts == ("tool",) and contents[0].pth_files == ("tool-extra.pth",)
    assert (site_packages(venv) / "tool" / "__init__.py").read_bytes().startswith(b"def main")
    assert (site_packages(venv) / "tool-1.2.dist-info" / "INSTALLER").read_bytes() == b"airgap\n"
    assert (venv / "bin" / "tool").read_bytes().startswith(f"#!{venv}/bin/python".encode())
    assert not list(venv.rglob("pip*")) and not list(venv.rglob("*.pyc"))
    assert check_venv_records(venv) == (7, [])  # 2 files, WHEEL, METADATA, entry points, INSTALLER, bin/tool
    (site_packages(venv) / "tool" / "__init__.py").write_bytes(b"import os\n")
    _, problems = check_venv_records(venv)
    assert len(problems) == 1
    assert problems[0].endswith("tool/__init__.py differs from what the wheel installed (RECORD)")


@pytest.mark.parametrize(("files", "entry_points", "message"), [
    ({}, "[console_scripts]\npython3 = x:main\n", "refused script 'python3'"),
    ({}, "[gui_scripts]\npip3 = x:main\n", "refused script 'pip3'"),
    ({"x-1.0.data/scripts/activate": b"#!/bin/sh\n"}, "", "refused script 'activate'"),
    ({"x-1.0.data/data/bin/python3.11": b"#!/bin/sh\n"}, "", "refused script 'python3.11'"),
    ({"sitecustomize.py": b"import os\n"}, "", "a top-level sitecustomize module runs at every start"),
    ({"x-1.0.data/purelib/usercustomize/__init__.py": b""}, "", "top-level usercustomize module"),
    ({"x-1.0.data/data/pyvenv.cfg": b"home = /tmp\n"}, "", "it would land on the virtualenv's own files"),
    ({"x-1.0.data/data/lib/python3.11/site-packages/sitecustomize.py": b""}, "", "top-level sitecustomize"),
    ({"../evil.py": b""}, "", "unsafe file name '../evil.py'"),
])
def test_hostile_wheels_are_refused_before_anything_is_written(tmp_path: Path, files: dict[str, bytes],
                                                               entry_points: str, message: str) -> None:
    bad = write_wheel(tmp_path / "w", "x", "1.0", files, entry_points=entry_points)
    with pytest.raises(FormatError, match=message.replace("(", r"\(").replace(".", r"\.")):
        examine_wheel(wheel(bad))
    venv = tmp_path / "venv"
    with pytest.raises(FormatError):
        install_wheels(venv, [wheel(bad)])
    assert not (site_packages(venv) / "x-1.0.dist-info").exists()


def test_a_wheel_named_pip_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="python package 'pip' refused: the virtualenv is made without pip"):
        examine_wheel(wheel(write_wheel(tmp_path, "pip", "24.0", {"pip/__init__.py": b""})))


def test_an_sdist_or_a_misnamed_file_is_no_wheel(tmp_path: Path) -> None:
    sdist = write_sdist(tmp_path, "x", "1.0", {"setup.py": "import os; os.system('id')\n"})
    with pytest.raises(FormatError, match=r"'x-1\.0\.tar\.gz' is not a wheel file name \(PEP 427"):
        examine_wheel(WheelToInstall(sdist, sdist.name, "x", "1.0"))
    good = write_wheel(tmp_path, "x", "1.0", {"x.py": b""})
    with pytest.raises(FormatError, match=r"its file 'x-1\.0-py3-none-any\.whl' is a wheel of x 1\.0"):
        examine_wheel(wheel(good, version="1.1"))
    not_zip = tmp_path / "y-1.0-py3-none-any.whl"
    not_zip.write_bytes(b"PK but not really")
    with pytest.raises(FormatError, match="not a zip archive, so not a wheel"):
        examine_wheel(wheel(not_zip))


def test_dist_info_must_match_and_record_must_hold_every_file(tmp_path: Path) -> None:
    other = write_wheel(tmp_path / "a", "x", "1.0", {"x.py": b""}, dist_info="y-1.0.dist-info")
    with pytest.raises(FormatError, match="not a valid wheel"):
        examine_wheel(wheel(other))
    lying = write_wheel(tmp_path / "b", "x", "1.0", {"x.py": b"print('evil')\n"}, record={"x.py": b"pass\n"})
    examine_wheel(wheel(lying))  # names and structure are fine; the content is checked as it is written
    with pytest.raises(FormatError, match="x.py: its content differs from the wheel's RECORD"):
        install_wheels(tmp_path / "venv", [wheel(lying)])


def test_two_wheels_may_not_write_the_same_file(tmp_path: Path) -> None:
    first = write_wheel(tmp_path, "a", "1.0", {"shared.py": b"a\n"})
    second = write_wheel(tmp_path, "b", "1.0", {"shared.py": b"b\n"})
    with pytest.raises(InstallError, match="b-1.0-py3-none-any.whl: refused to overwrite .*shared.py"):
        install_wheels(tmp_path / "venv", [wheel(first), wheel(second)])


def test_after_install_exactly_the_manifests_packages_are_there(tmp_path: Path) -> None:
    good = write_wheel(tmp_path, "x", "1.0", {"x.py": b""})
    install_wheels(tmp_path / "venv", [wheel(good)])
    meta = site_packages(tmp_path / "venv") / "x-1.0.dist-info" / "METADATA"
    meta.write_bytes(meta.read_bytes().replace(b"Version: 1.0", b"Version: 2.0"))
    with pytest.raises(InstallError, match="expected x 1.0, found x 2.0"):
        check_installed(tmp_path / "venv", [wheel(good)])
    with pytest.raises(InstallError, match="expected y 1.0, found nothing more"):
        check_installed(tmp_path / "venv", [wheel(good, version="2.0"), WheelToInstall(good, good.name, "y", "1.0")])
