"""Outbound Telepresence: the laptop as one more pod of the cluster."""

__version__ = "0.1.0"
