"""Ansible callback: at the end of a rollout, one line per host (updated, unchanged, failed and why,
unreachable, not reached) and, with AIRGAP_ROLLOUT_REPORT=FILE, the same as JSON. With
AIRGAP_ROLLOUT_PROFILE=FILE, the seconds each task took (summed over hosts and batches), slowest first."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: airgap_rollout
type: aggregate
short_description: a per-host summary of an airgap rollout
description: Prints which hosts were updated, left unchanged, failed (with the reason) or were unreachable.
"""

REPORT_ENV = "AIRGAP_ROLLOUT_REPORT"
PROFILE_ENV = "AIRGAP_ROLLOUT_PROFILE"


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "airgap_rollout"
    CALLBACK_NEEDS_ENABLED = False

    def __init__(self) -> None:
        super().__init__()
        self.hosts: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.task_started: tuple[str, float] | None = None
        self.task_seconds: dict[str, float] = {}

    def _close_task(self) -> None:
        if self.task_started is not None:
            name, started = self.task_started
            self.task_seconds[name] = self.task_seconds.get(name, 0.0) + time.monotonic() - started
            self.task_started = None

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        self._close_task()
        self.task_started = (task.get_name(), time.monotonic())

    def _entry(self, host: str) -> dict[str, Any]:
        if host not in self.hosts:
            self.hosts[host] = {"host": host, "outcome": "not reached"}
            self.order.append(host)
        return self.hosts[host]

    def v2_playbook_on_play_start(self, play: Any) -> None:
        # the whole group, not the play's hosts: with `serial` those are only the current batch
        group = play.get_variable_manager()._inventory.groups.get("airgap_servers")
        for host in group.get_hosts() if group is not None else []:
            self._entry(host.name)

    def v2_runner_on_ok(self, result: Any) -> None:
        host = result.host.get_name()
        if host not in self.hosts:
            return
        entry = self.hosts[host]
        facts = result.result.get("ansible_facts", {})
        if "airgap_report_entry" in facts:
            entry.update(facts["airgap_report_entry"])
            entry["outcome"] = facts["airgap_report_entry"]["action"]
        elif entry["outcome"] == "not reached":
            entry["outcome"] = "started"

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        host = result.host.get_name()
        if ignore_errors or host not in self.hosts:
            return
        self.hosts[host].update(outcome="failed", reason=str(result.result.get("msg", "")).strip(),
                                task=result.task.get_name())

    def v2_runner_on_unreachable(self, result: Any) -> None:
        host = result.host.get_name()
        if host in self.hosts:
            self.hosts[host].update(outcome="unreachable", reason=str(result.result.get("msg", "")).strip())

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._close_task()
        profile = os.environ.get(PROFILE_ENV)
        if profile:
            with open(profile, "w", encoding="utf-8") as handle:
                slowest = sorted(self.task_seconds.items(), key=lambda item: -item[1])
                json.dump([{"task": name, "seconds": round(seconds, 2)} for name, seconds in slowest], handle,
                          indent=2)
        if not self.order:
            return
        self._display.banner("AIRGAP ROLLOUT")
        for host in self.order:
            entry = self.hosts[host]
            versions = f" {entry.get('before') or '-'} -> {entry['after']}" if entry.get("after") else ""
            reason = f": {entry['reason']}" if entry.get("reason") else ""
            self._display.display(f"{host}: {entry['outcome']}{versions}{reason}")
        path = os.environ.get(REPORT_ENV)
        if path:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump([self.hosts[h] for h in self.order], handle, indent=2)
