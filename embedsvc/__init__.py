"""embedsvc: a self-hosted embedding inference service."""

__version__ = "0.1.0"
