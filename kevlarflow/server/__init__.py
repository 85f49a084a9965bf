"""OpenAI-compatible HTTP server over an AsyncEngine (`kevlarflow serve`)."""
from kevlarflow.server.app import build_app

__all__ = ["build_app"]
