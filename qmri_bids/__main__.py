"""``python -m qmri_bids`` runs the command line."""

from qmri_bids.cli.run import main

if __name__ == "__main__":
    raise SystemExit(main())
