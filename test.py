"""Score a trained model on a hold-out folder of images with a CSV of labels, or predict a folder:
`python test.py --help`.

The command line is finegrained/holdout.py's; this file is its entry point, as the design card asks."""
from finegrained import cli
from finegrained.holdout import main

if __name__ == "__main__":
    cli.run(main)
