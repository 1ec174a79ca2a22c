"""A wheel of the running airgap itself, so the isolated host needs nothing but Python and the bundle.

Written straight from the imported package and its installed metadata, byte for byte reproducible
(sorted entries, fixed timestamps), with no build backend and no network: this also works on a host
where airgap itself was installed from a bundle.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from importlib import metadata
from pathlib import Path

import airgap
from airgap.errors import AirgapError

_WHEEL_FILE = "Wheel-Version: 1.0\nGenerator: airgap\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
_ENTRY_POINTS = "[console_scripts]\nairgap = airgap.cli:main\n"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def self_wheel_name() -> str:
    return f"airgap-{airgap.__version__}-py3-none-any.whl"


def runtime_requirements() -> list[str]:
    """airgap's own runtime dependencies, as its metadata declares them (extras excluded)."""
    requires = metadata.requires("airgap") or []
    return [r for r in requires if "extra ==" not in r]


def build_self_wheel(dest: Path) -> Path:
    """Write `airgap-<version>-py3-none-any.whl` into `dest` and return its path."""
    package_dir = Path(airgap.__file__).parent
    dist_info = f"airgap-{airgap.__version__}.dist-info"
    files = {
        f"airgap/{p.relative_to(package_dir).as_posix()}": p.read_bytes()
        for p in sorted(package_dir.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    files[f"{dist_info}/METADATA"] = _metadata_text().encode()
    files[f"{dist_info}/WHEEL"] = _WHEEL_FILE.encode()
    files[f"{dist_info}/entry_points.txt"] = _ENTRY_POINTS.encode()
    record_name = f"{dist_info}/RECORD"
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[record_name] = (record + f"{record_name},,\n").encode()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / self_wheel_name()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, data)
    return path


def _metadata_text() -> str:
    try:
        text = metadata.distribution("airgap").read_text("METADATA")
    except metadata.PackageNotFoundError:
        text = None
    if not text:
        raise AirgapError("cannot package airgap itself: its installed metadata (METADATA) was not found")
    version_line = f"Version: {airgap.__version__}"
    if version_line not in text.splitlines():
        raise AirgapError(f"installed airgap metadata does not match the code: expected {version_line!r}")
    return text


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"
