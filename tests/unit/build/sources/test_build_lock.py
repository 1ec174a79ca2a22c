"""The build lock (airgap.build.sources.engine.build_lock): builds of one cache key take turns, and a build that
waited finds the entry the other one finished instead of compiling again."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from airgap.build.sources import engine
from airgap.streams.pipeline import digest_file

SDIST_SHA256 = "1" * 64


def test_a_second_holder_waits_until_the_first_lets_go(tmp_path: Path) -> None:
    order: list[str] = []
    first_holds = threading.Event()

    def first() -> None:
        with engine.build_lock(tmp_path, "k"):
            order.append("first in")
            first_holds.set()
            time.sleep(0.3)
            order.append("first out")

    def second() -> None:
        first_holds.wait(5)
        with engine.build_lock(tmp_path, "k"):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert order == ["first in", "first out", "second in"]
    assert (tmp_path / "k.lock").is_file()


def test_other_keys_do_not_wait(tmp_path: Path) -> None:
    with engine.build_lock(tmp_path, "a"):
        entered = threading.Event()

        def other() -> None:
            with engine.build_lock(tmp_path, "b"):
                entered.set()

        thread = threading.Thread(target=other)
        thread.start()
        assert entered.wait(5)
        thread.join(5)


def _write_entry(cache: Path, key: str) -> None:
    files = cache / key / "files"
    files.mkdir(parents=True)
    (files / "llama-server").write_bytes(b"built by the other process")
    record = {"files": {"llama-server": digest_file(files / "llama-server").sha256}}
    (cache / key / engine.BUILD_RECORD).write_text(json.dumps(record), encoding="utf-8")


def test_a_build_that_waited_takes_the_entry_the_other_one_finished(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    key = engine.cache_key("0.3.36", SDIST_SHA256)
    result: list[engine.BuiltEngine] = []
    # no such sdist: had the waiting build not looked at the cache again, it would fail trying to unpack it
    missing = tmp_path / "absent.tar.gz"

    def waiting_build() -> None:
        result.append(engine.build_engine(missing, version="0.3.36", sdist_sha256=SDIST_SHA256, cache_dir=cache,
                                          progress=False))

    with engine.build_lock(cache, key):
        thread = threading.Thread(target=waiting_build)
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive() and not result
        _write_entry(cache, key)
    thread.join(10)
    assert len(result) == 1 and result[0].cached
    assert [f.name for f in result[0].files] == ["llama-server"]
