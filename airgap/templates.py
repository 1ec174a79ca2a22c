"""Operator-facing files (systemd units, the sheet on a USB stick) rendered with jinja2; its only user."""

from __future__ import annotations

from typing import Any

import jinja2

from airgap.errors import AirgapError

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("airgap", "templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,  # plain-text outputs (unit files, README.txt), never HTML
)


def render(template: str, **context: Any) -> str:
    try:
        return _ENV.get_template(template).render(**context)
    except jinja2.TemplateError as exc:
        raise AirgapError(f"cannot render {template}: {exc}") from exc
