"""``python -m kcd_fast.train``: the trainer's command line (see kcd_fast/train/config.py for the options)."""
import sys

from kcd_fast.train.main import cli

sys.exit(cli())
