"""Bundled recipes (recipes.toml) and the demo triple; data only."""
