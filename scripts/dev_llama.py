"""Install llama-cpp-python[server] into the running virtualenv from airgap's cached source build."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from airgap.build.sources.wheels import resolve_wheels

REQUIREMENT = "llama-cpp-python[server]==0.3.36"


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        wheels = Path(folder)
        print(f"setup: building or reusing the {REQUIREMENT} wheel (minutes on a fresh machine)", file=sys.stderr)
        resolve_wheels([REQUIREMENT], dest=wheels, progress=False)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
                        REQUIREMENT], check=True)


if __name__ == "__main__":
    main()
