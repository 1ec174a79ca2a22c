"""Sneakernet through the real CLI: split or copy to a 'stick', then verify and install from volumes."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Built
from tests.support import airgap


def test_copy_then_install_from_volumes_offline(built: Built, tmp_path: Path) -> None:
    stick = tmp_path / "usb"
    result = airgap("copy", built.bundle, stick, "--volume-size", "2M", "--parity", "1", "-q")
    assert result.code == 0, result.stderr
    volumes = sorted(stick.glob("*.airgap.0*"))
    assert len(volumes) >= 3 and (stick / "README.txt").is_file()
    assert all(v.stat().st_size <= 2 << 20 for v in volumes)
    assert "--trust" in (stick / "README.txt").read_text()

    volumes[1].unlink()  # a lost volume is rebuilt from the recovery volume
    result = airgap("install", volumes[0], "--trust", built.keys.public, "--prefix", tmp_path / "p", "-q",
                    no_network=True)
    assert result.code == 0, result.stderr
    assert "repaired volume 2 of" in result.stdout
    assert (tmp_path / "p" / "current" / "models" / "tiny").is_dir()


def test_split_damaged_volume_named(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "vols"
    assert airgap("split", built.bundle, "--volume-size", "1M", "-o", out, "-q").code == 0
    third = sorted(out.glob("*.airgap.0*"))[2]
    data = bytearray(third.read_bytes())
    data[1000] ^= 0xFF
    third.write_bytes(bytes(data))
    result = airgap("verify", out, "--trust", built.keys.public)
    assert result.code != 0
    assert "volume 3 of" in result.error_line and result.error_line.startswith("airgap: error:")
    result = airgap("install", out, "--trust", built.keys.public, "--prefix", tmp_path / "p")
    assert result.code != 0 and "volume 3 of" in result.error_line
    assert not (tmp_path / "p" / "current").exists()
