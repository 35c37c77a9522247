"""Pieces both daemons share: the result contract, settings, Kafka config, logging."""

__version__ = "0.2.0"
