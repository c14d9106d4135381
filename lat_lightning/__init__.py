"""lat-lightning: latent-space safety attacks, scans and defences for causal LMs."""
__version__ = "0.1.0"
