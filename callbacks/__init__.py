"""Training callbacks shipped as lat_lightning.callbacks."""
