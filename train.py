"""Single entry point: ``python train.py --recipe NAME [overrides]`` (see ``--help``)."""

from lat_lightning.cli import entry

if __name__ == "__main__":
    entry()
