#!/usr/bin/python
"""Ansible module, run on the load balancer: take a server out of rotation or put it back, through HAProxy's
runtime API on its admin socket (`set server B/S state ...`, `show stat`)."""

from __future__ import annotations

import csv
import io
import socket
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: airgap_haproxy
short_description: Drain a server and put it in maintenance, or make it ready and wait until it is UP
options:
  socket: {type: str, required: true, description: "HAProxy's admin socket (stats socket ... level admin)"}
  backend: {type: str, required: true}
  server: {type: str, required: true}
  state: {type: str, required: true, choices: [maint, ready], description: "maint drains open requests first"}
  timeout: {type: float, default: 300, description: "seconds to wait for the drain or for UP"}
"""


def command(path: str, line: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def server_row(path: str, backend: str, server: str) -> dict[str, str] | None:
    text = command(path, "show stat").lstrip("# ")
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("pxname") == backend and row.get("svname") == server:
            return row
    return None


def main() -> None:
    module = AnsibleModule(argument_spec={
        "socket": {"type": "str", "required": True},
        "backend": {"type": "str", "required": True},
        "server": {"type": "str", "required": True},
        "state": {"type": "str", "required": True, "choices": ["maint", "ready"]},
        "timeout": {"type": "float", "default": 300.0},
    }, supports_check_mode=True)
    path, backend, server, state = (module.params[k] for k in ("socket", "backend", "server", "state"))
    target = f"{backend}/{server}"
    try:
        row = server_row(path, backend, server)
    except OSError as exc:
        module.fail_json(msg=f"cannot reach HAProxy's admin socket {path}: {exc.strerror or exc}")
    if row is None:
        module.fail_json(msg=f"HAProxy has no server {target}: expected it in the rendered config")
    status = row["status"]
    wanted_now = status.startswith("MAINT") if state == "maint" else not status.startswith(("MAINT", "DRAIN"))
    if module.check_mode:
        module.exit_json(changed=not wanted_now, status=status)
    deadline = time.monotonic() + module.params["timeout"]
    changed = False
    if state == "maint":
        if not status.startswith("MAINT"):
            # drain: no new requests, open ones finish; then maintenance stops the health checks too
            answer = command(path, f"set server {target} state drain").strip()
            if answer:
                module.fail_json(msg=f"HAProxy refused to drain {target}: {answer}")
            while True:
                row = server_row(path, backend, server) or row
                if int(row["scur"] or 0) == 0 and int(row["qcur"] or 0) == 0:
                    break
                if time.monotonic() > deadline:
                    module.fail_json(msg=f"{target} still has {row['scur']} open requests after "
                                         f"{module.params['timeout']:g} s")
                time.sleep(0.1)
            command(path, f"set server {target} state maint")
            changed = True
    else:
        if status.startswith(("MAINT", "DRAIN")):
            answer = command(path, f"set server {target} state ready").strip()
            if answer:
                module.fail_json(msg=f"HAProxy refused to make {target} ready: {answer}")
            changed = True
        while True:
            row = server_row(path, backend, server) or row
            if row["status"].startswith("UP") or row["status"] == "no check":
                break
            if time.monotonic() > deadline:
                module.fail_json(msg=f"{target} is {row['status']} after {module.params['timeout']:g} s: "
                                     "HAProxy's health check does not pass")
            time.sleep(0.1)
    module.exit_json(changed=changed, status=row["status"])


if __name__ == "__main__":
    main()
