"""Fill a test machine's llama.cpp caches with airgap's own cached builders, once: the llama-cpp-python[server]
wheel (installed into the running virtualenv) and llama-server with this host's ggml CPU variant, the engine
that every engine test's spec asks for (`tests.support.engine_table`). Both are compiled from the same pinned
sdist; a second run finds both in the cache and compiles nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from airgap.build.sources.engine import (  # noqa: E402
    BUILD_RECORD,
    cached_engine,
    chosen_variants,
    default_cache_dir,
    engine_for,
)
from airgap.build.sources.wheels import Pin, Pip, resolve_wheels  # noqa: E402
from tests.support import host_cpu_variant  # noqa: E402

VERSION = "0.3.36"
REQUIREMENT = f"llama-cpp-python[server]=={VERSION}"


def already_done(variants: tuple[str, ...]) -> bool:
    """llama_cpp.server imports here, and an intact engine with these variants is in the cache."""
    if subprocess.run([sys.executable, "-c", "import llama_cpp.server"], capture_output=True).returncode != 0:
        return False
    cache = default_cache_dir()
    for record in cache.glob(f"llama-server-{VERSION}-*/{BUILD_RECORD}"):
        try:
            recorded = json.loads(record.read_text(encoding="utf-8")).get("variants")
        except (OSError, ValueError):
            continue
        if recorded == list(variants) and cached_engine(cache, record.parent.name) is not None:
            return True
    return False


def main() -> None:
    variants = chosen_variants([host_cpu_variant()])
    if already_done(variants):
        return
    with tempfile.TemporaryDirectory() as folder:
        wheels = Path(folder)
        print(f"setup: building or reusing the {REQUIREMENT} wheel (minutes on a fresh machine)", file=sys.stderr)
        resolved = resolve_wheels([REQUIREMENT], dest=wheels, progress=False)
        if subprocess.run([sys.executable, "-c", "import llama_cpp.server"], capture_output=True).returncode != 0:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                            str(wheels), REQUIREMENT], check=True)
    llama = next(w for w in resolved if w.name == "llama-cpp-python")
    sdist = Pin(name=llama.name, version=llama.version, filename=llama.source["from"],
                sha256=llama.source["sdist_sha256"], url=llama.source.get("sdist_url", ""))
    print(f"setup: building or reusing llama-server with CPU variants {', '.join(variants)} (about 12 minutes on "
          "2 cores the first time)", file=sys.stderr)
    started = time.monotonic()
    built = engine_for(sdist, Pip(progress=False), cache_dir=default_cache_dir(), variants=variants, progress=True)
    how = "from the cache" if built.cached else f"compiled in {time.monotonic() - started:.0f} s"
    print(f"setup: llama-server with CPU variants {', '.join(variants)}: {how}", file=sys.stderr)


if __name__ == "__main__":
    main()
