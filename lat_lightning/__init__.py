"""lat-lightning: latent-space safety attacks, scans and defences for causal LMs."""

from lat_lightning.threads import set_wait_policy as _set_wait_policy

__version__ = "0.1.0"

# OpenMP threads sleep instead of spinning while they wait (a busy machine stays fast); read by the OpenMP runtime
# when torch is first imported, hence here. An explicit OMP_WAIT_POLICY wins (lat_lightning/threads.py).
_set_wait_policy()
