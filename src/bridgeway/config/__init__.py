from bridgeway.config.loader import ConfigError, load_config, parse_config
from bridgeway.config.models import Config, ServiceConfig

__all__ = ["Config", "ConfigError", "ServiceConfig", "load_config", "parse_config"]
