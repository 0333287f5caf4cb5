"""HTTP: the two dialects (TEI and OpenAI), ops routes and error rendering. No model logic."""

from embedsvc.api.app import create_app

__all__ = ["create_app"]
