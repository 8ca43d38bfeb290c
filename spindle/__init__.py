"""Spindle: plan and run multi-task multi-modal training as waves on disjoint device groups."""

__version__ = "0.1.0"
