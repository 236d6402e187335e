"""Train a recipe end to end, then score the test set once: `python run.py --help`.

The command line is finegrained/runner.py's; this file is its entry point, as the design card asks."""
from finegrained import cli
from finegrained.runner import main

if __name__ == "__main__":
    cli.run(main)
