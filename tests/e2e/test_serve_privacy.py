"""What `airgap serve` keeps: no prompt or completion content in any file under the prefix or in its logs;
its start and stop are in the audit trail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.serve_support import STEADY_ASCII, free_port, make_installed_prefix, wait_until
from tests.support import REPO

SECRET = "zebra-7f3a9c-do-not-keep-me"


def files_under(folder: Path) -> list[Path]:
    found = []
    for root, _, names in os.walk(folder, followlinks=False):  # the venv link leads out of the prefix
        found += [Path(root) / n for n in names if not (Path(root) / n).is_symlink()]
    return found


@pytest.mark.slow
def test_a_secret_in_a_prompt_is_kept_nowhere(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp.server")
    install = make_installed_prefix(tmp_path)
    prefix, port = install.prefix, free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    with (logs / "stdout").open("wb") as out, (logs / "stderr").open("wb") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "airgap", "serve", "--prefix", str(prefix), "--port", str(port),
             "--threads", "1", "--n-ctx", "512"], stdout=out, stderr=err, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            def healthy() -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                        return bool(answer.status == 200)
                except OSError:
                    return False

            wait_until(healthy, 120, "the server to answer /health")
            body = {"model": install.model_ids[0], "max_tokens": 16, "logit_bias": STEADY_ASCII,
                    "messages": [{"role": "user", "content": f"remember {SECRET} for me"}]}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as answer:
                completion = json.loads(answer.read())["choices"][0]["message"]["content"]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    audit = prefix / "audit.jsonl"
    wait_until(lambda: audit.exists() and audit.read_text().count('"command":"serve"') == 2, 30,
               "the stop record")
    events = [json.loads(line)["details"] for line in audit.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "stop"]
    assert events[0]["content_logged"] is False and events[0]["models"] == list(install.model_ids)

    logged = (logs / "stdout").read_text() + (logs / "stderr").read_text()
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in logged  # the request line is logged: no content
    kept = [*files_under(prefix), logs / "stdout", logs / "stderr"]
    for path in kept:
        data = path.read_bytes()
        assert SECRET.encode() not in data, path
        if len(completion.strip()) >= 12:
            assert completion.strip().encode() not in data, path
