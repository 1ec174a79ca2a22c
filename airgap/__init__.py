"""airgap: signed, verified, offline bundles of open-weight LLMs and everything needed to serve them."""

__version__ = "0.1.0"
