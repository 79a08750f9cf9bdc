from bridgeway.api.app import build_api

__all__ = ["build_api"]
