"""Recipes (YAML) shipped as lat_lightning.recipes."""
