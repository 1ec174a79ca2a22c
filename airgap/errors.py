"""One error root for everything airgap refuses, with messages written for operators.

Every message says what was expected and what was found, on one line, so the CLI can print it as is.
"""

from __future__ import annotations


class AirgapError(Exception):
    """Root of every error airgap raises on purpose; the CLI prints its message on one line."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


class SpecError(AirgapError):
    """A bundle spec (TOML) is malformed or names something that does not exist."""


class FormatError(AirgapError):
    """A bundle, manifest or volume does not follow the documented format."""


class IntegrityError(AirgapError):
    """Bytes differ from what the signed manifest says (size or SHA-256)."""


class SignatureError(AirgapError):
    """A signature is missing, malformed, from an untrusted key or below the threshold."""


class TrustError(AirgapError):
    """Trust metadata (keys, roots, rotation) is invalid, expired or replayed."""


class PolicyError(AirgapError):
    """The bundle is authentic but refused by policy: expired, downgrade, replay, wrong base."""


class InstallError(AirgapError):
    """Installing failed; the previously active version is untouched."""


class UnsafePathError(InstallError):
    """The prefix, or a folder above it, could be changed by another user; or a name in it is a planted link."""


class DiskFullError(InstallError):
    """The file system of the prefix ran out of space; nothing was changed."""


class ResolveError(AirgapError):
    """Python requirements could not be resolved or fetched."""


class MissingDependencyError(AirgapError):
    """A Python package that this command needs (an optional extra of airgap) is not installed."""


class FetchError(AirgapError):
    """A model or file could not be fetched from its source."""


class KeyFileError(AirgapError):
    """A key file is missing, unreadable, of the wrong type or wrongly encrypted."""


class ServeError(AirgapError):
    """The model server could not be planned, started or reached."""


class PlanError(ServeError):
    """The model does not fit this host's memory at the minimum context."""


class VolumeError(AirgapError):
    """A volume of a split bundle is missing, truncated, swapped or corrupted."""


class ProbeError(AirgapError):
    """A host probe (probe.json) is unreadable, malformed or of a probe format this airgap does not read."""


class FitError(AirgapError):
    """A model cannot fit the target host's memory even at the smallest context; nothing was downloaded."""


class FleetError(AirgapError):
    """A fleet report's input (one host's gathered status) is missing or malformed."""
