"""Configuration, read from YAML with no torch import: the typed schema and its checks,
recipes, training settings, adapter presets and the built-in YAML libraries."""
