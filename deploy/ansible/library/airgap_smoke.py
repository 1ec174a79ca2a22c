#!/usr/bin/python
"""Ansible module, run on a serving host: wait for airgap's GET /health, then one real chat completion."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: airgap_smoke
short_description: Wait for `airgap serve` to answer /health, then run one chat completion
options:
  base_url: {type: str, required: true, description: "http://HOST:PORT of the server"}
  api_key_file: {type: str, default: "", description: "file holding the API key (read on the host)"}
  timeout: {type: float, default: 120, description: "seconds to wait for /health and for the completion"}
  chat: {type: bool, default: true, description: "also run one chat completion with the first model"}
"""


def _request(url: str, key: str, timeout: float, body: dict[str, object] | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, OSError):
        return 0, b""


def main() -> None:
    module = AnsibleModule(argument_spec={
        "base_url": {"type": "str", "required": True},
        "api_key_file": {"type": "str", "default": "", "no_log": False},
        "timeout": {"type": "float", "default": 120.0},
        "chat": {"type": "bool", "default": True},
    })
    base = module.params["base_url"].rstrip("/")
    timeout = module.params["timeout"]
    key = ""
    if module.params["api_key_file"]:
        try:
            with open(module.params["api_key_file"], encoding="utf-8") as handle:
                key = handle.read().strip()
        except OSError as exc:
            module.fail_json(msg=f"cannot read the API key file {module.params['api_key_file']}: {exc.strerror}")
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        status, _ = _request(base + "/health", "", 5)
        if status == 200:
            break
        time.sleep(0.25)
    if status != 200:
        module.fail_json(msg=f"{base}/health did not answer 200 within {timeout:g} s (last: {status or 'no answer'})",
                         healthy=False)
    if not module.params["chat"]:
        module.exit_json(changed=False, healthy=True)
    status, body = _request(base + "/v1/models", key, timeout)
    try:
        model = json.loads(body)["data"][0]["id"] if status == 200 else None
    except (ValueError, KeyError, IndexError, TypeError):
        model = None
    if model is None:
        module.fail_json(msg=f"{base}/v1/models: expected 200 with a model, found {status}: {body[:200]!r}",
                         healthy=True)
    status, body = _request(base + "/v1/chat/completions", key, timeout, {
        "model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1})
    try:
        reply = json.loads(body) if status == 200 else {}
        content = reply["choices"][0]["message"]["content"]
        tokens = int(reply["usage"]["completion_tokens"])
    except (ValueError, KeyError, IndexError, TypeError):
        module.fail_json(msg=f"{base}/v1/chat/completions: expected 200 with a reply, found {status}: {body[:200]!r}",
                         healthy=True)
    if tokens < 1:
        module.fail_json(msg=f"{base}/v1/chat/completions: the reply has no tokens", healthy=True)
    module.exit_json(changed=False, healthy=True, model=model, completion_tokens=tokens, reply=content)


if __name__ == "__main__":
    main()
