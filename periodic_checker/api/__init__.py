"""The checker's HTTP API: `create_app(service, settings)` builds the aiohttp application."""

from periodic_checker.api.app import create_app

__all__ = ["create_app"]
