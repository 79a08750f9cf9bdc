"""Bridgeway: one front door for AI services and LLM providers."""

__version__ = "0.1.0"
