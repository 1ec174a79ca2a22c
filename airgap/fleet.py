"""The fleet view: `airgap status --json` gathered from many hosts (by deploy/ansible/fleet.yml) as one table.

Each host is one JSON file, `{"host": NAME, "status": <airgap status --json> | null, "error": TEXT | null}`.
A host differs when its active bundle (name and manifest SHA-256) is not the one most hosts run.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airgap.errors import FleetError


@dataclass(frozen=True)
class HostView:
    host: str
    name: str | None  # the active bundle's name; None when nothing is active or the host did not answer
    version: str | None
    manifest_sha256: str | None
    installed: tuple[str, ...]  # every installed version, oldest first
    error: str | None  # why there is no status (unreachable, airgap missing)
    differs: bool = False


@dataclass(frozen=True)
class FleetView:
    hosts: tuple[HostView, ...]
    common: str | None  # "name version" that most answering hosts run; None without a majority

    @property
    def differing(self) -> tuple[str, ...]:
        return tuple(h.host for h in self.hosts if h.differs)


def host_view(record: dict[str, Any], origin: str) -> HostView:
    """One host's view from its gathered record; FleetError naming `origin` when the record is malformed."""
    try:
        host = str(record["host"])
        status = record.get("status")
        error = record.get("error")
        if status is None:
            return HostView(host, None, None, None, (), str(error or "no status"))
        generations = status["generations"]
        active = next((g for g in generations if g["id"] == status["active"]), None)
        installed = tuple(str(g["version"]) for g in generations)
    except (KeyError, TypeError, AttributeError) as exc:
        raise FleetError(f"{origin}: expected a host record with the output of `airgap status --json`, "
                         f"found a record without {exc}") from exc
    if active is None:
        return HostView(host, None, None, None, installed, None)
    return HostView(host, str(active["name"]), str(active["version"]), str(active["manifest_sha256"]), installed,
                    None)


def fleet_view(hosts: Sequence[HostView]) -> FleetView:
    """Mark the hosts that do not run what most answering hosts run (unanswered hosts always differ)."""
    counts = Counter((h.name, h.manifest_sha256) for h in hosts if h.error is None and h.name is not None)
    ranked = counts.most_common(2)
    majority = ranked[0][0] if ranked and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]) else None
    common = next((f"{h.name} {h.version}" for h in hosts if (h.name, h.manifest_sha256) == majority), None)
    marked = tuple(
        HostView(h.host, h.name, h.version, h.manifest_sha256, h.installed, h.error,
                 differs=h.error is not None or (h.name, h.manifest_sha256) != majority)
        for h in sorted(hosts, key=lambda h: h.host)
    )
    return FleetView(marked, common)


def read_fleet(folder: Path) -> FleetView:
    """The view of every `*.json` host record in `folder`."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise FleetError(f"expected host records (*.json) in {folder}, found none")
    views = []
    for path in files:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise FleetError(f"{path}: expected a JSON host record, found {exc}") from exc
        views.append(host_view(record, str(path)))
    return fleet_view(views)


def render_table(view: FleetView) -> str:
    rows = [("host", "active", "manifest", "installed", "note")]
    for h in view.hosts:
        active = f"{h.name} {h.version}" if h.name else "-"
        note = h.error or ("differs" if h.differs else "")
        rows.append((h.host, active, (h.manifest_sha256 or "-")[:12], ", ".join(h.installed) or "-", note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    summary = (f"{len(view.hosts)} host(s); most run {view.common}" if view.common
               else f"{len(view.hosts)} host(s); no version runs on most of them")
    if view.differing:
        summary += f"; differing: {', '.join(view.differing)}"
    return "\n".join([*lines, summary])
