"""Typed run configuration: the schema (schema.py: dataclasses, each field with its doc and range rule),
loading (load.py: YAML, ``key=value`` overrides, the type checker) and checking (validate.py: range and
cross-field rules, and ``load_config``). This package exports the schema and loading names; checking
imports the plug-in tables (losses, data formats), so it is imported from ``preftune.config.validate``."""

from preftune.config.load import (
    apply_overrides,
    apply_shorthands,
    build,
    check_type,
    load_raw,
    merge,
    nest,
    parse_overrides,
    to_dict,
    to_yaml,
)
from preftune.config.schema import (
    EMBEDDED_MODEL,
    Config,
    ConfigError,
    DataConfig,
    DPOConfig,
    EvalConfig,
    EvalDatasetConfig,
    HeldoutConfig,
    LoraConfig,
    RoundsConfig,
    SFTConfig,
    TrainConfig,
    WinrateConfig,
)

__all__ = [
    "EMBEDDED_MODEL", "Config", "ConfigError", "DataConfig", "DPOConfig", "EvalConfig", "EvalDatasetConfig",
    "HeldoutConfig", "LoraConfig", "RoundsConfig", "SFTConfig", "TrainConfig", "WinrateConfig",
    "apply_overrides", "apply_shorthands", "build", "check_type", "load_raw", "merge", "nest",
    "parse_overrides", "to_dict", "to_yaml",
]
