"""Fill a folder with binary wheels once, so tests can later resolve against it with pip --no-index.

    python scripts/wheelhouse.py DEST -r click jinja2 [--python-version 3.12 --platform manylinux_2_28_x86_64]

Downloads with pip's own configuration (the package source this machine reaches). A second run with the
same arguments finds its stamp file and returns at once without starting pip.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="folder to fill with wheels")
    parser.add_argument("-r", "--requirements", nargs="+", required=True, help="requirement specifiers")
    parser.add_argument("--python-version", help="target Python, e.g. 3.12 (default: this interpreter)")
    parser.add_argument("--platform", action="append", default=[], help="target platform tag (repeatable)")
    parser.add_argument("--no-deps", action="store_true", help="fetch only the named projects")
    args = parser.parse_args(argv)
    request = Request(tuple(args.requirements), args.python_version, tuple(args.platform), args.no_deps)
    files = fill(args.dest, request)
    print(f"{args.dest}: {len(files)} wheels for {' '.join(args.requirements)}")
    return 0


@dataclass(frozen=True)
class Request:
    requirements: tuple[str, ...]
    python_version: str | None = None
    platforms: tuple[str, ...] = ()
    no_deps: bool = False

    def stamp_name(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return f".wheelhouse-{digest}.json"

    def pip_download(self, into: Path) -> list[str]:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        command += ["-d", str(into), "--only-binary", ":all:"]
        if self.no_deps:
            command.append("--no-deps")
        if self.python_version is not None:
            abi = "cp" + self.python_version.replace(".", "")
            command += ["--python-version", self.python_version, "--implementation", "cp", "--abi", abi]
        for platform in self.platforms:
            command += ["--platform", platform]
        return [*command, *self.requirements]


def fill(dest: Path, request: Request) -> list[str]:
    """Download the wheels unless a stamp says an identical request already did; return the file names."""
    stamp = dest / request.stamp_name()
    if stamp.is_file():
        files: list[str] = json.loads(stamp.read_text(encoding="utf-8"))["files"]
        if all((dest / name).is_file() for name in files):
            return files
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as staging:
        subprocess.run(request.pip_download(Path(staging)), check=True)
        files = sorted(path.name for path in Path(staging).iterdir())
        for name in files:
            shutil.move(Path(staging) / name, dest / name)
    stamp.write_text(json.dumps({**asdict(request), "files": files}, indent=2) + "\n", encoding="utf-8")
    return files


if __name__ == "__main__":
    sys.exit(main())
