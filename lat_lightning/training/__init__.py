"""Training: the LightningModule (attack inner loop, defence outer update), the fit driver, the supervised
fine-tuning driver, resume, distributed strategies and weight interpolation."""
