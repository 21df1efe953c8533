"""Typed configuration: YAML + `--set` overrides, validated once at load.

Every error names the field, the bad value and what is allowed; all errors of a file are
collected and reported together (one `ConfigError` whose lines are printed by the CLI).
schema.py holds the sections, loader.py the typed loading, checks.py the cross-field checks.
"""

from fedprompt.config.loader import INT_RANGE, ConfigError, load_config, parse_override
from fedprompt.config.schema import (
    AttackConfig,
    AuditConfig,
    ClientConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    FederationConfig,
    ModelConfig,
    OutputConfig,
    PeftConfig,
    PrivacyConfig,
    ServerConfig,
    TrainConfig,
)

__all__ = [
    "INT_RANGE",
    "AttackConfig",
    "AuditConfig",
    "ClientConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "FederationConfig",
    "ModelConfig",
    "OutputConfig",
    "PeftConfig",
    "PrivacyConfig",
    "ServerConfig",
    "TrainConfig",
    "load_config",
    "parse_override",
]
