"""Train a recipe's stages into a run folder (model, checkpoints, history, curves, report) and score nothing on
the test set: the model is then scored by test.py on the hold-out you choose. Same flags as run.py.

    python train.py --recipe resnets_sgd --out runs/sgd        # then: python test.py --model runs/sgd ...
    python train.py --out runs/sgd --resume                    # continue it after a stop

run.py is this and then the test set's score; the stages themselves are finegrained/train.py."""
from finegrained import cli
from finegrained.runner import main as run_recipe


def main(argv=None):
    return run_recipe(argv, score_test=False, description=__doc__)


if __name__ == "__main__":
    cli.run(main)
