"""Show the learner a recipe builds: the backbone (a torchvision ResNet/ResNeXt, or any timm model by name), the
head, the parameter groups the discriminative learning rates split, and what each stage trains.

    python models.py                                          # the published recipe: ResNeXt50, concat head
    python models.py --arch convnext_tiny --head bilinear     # any timm backbone, another head
    python models.py --recipe resnets_sgd --classes 100

The learner itself (finegrained/models.py) is what run.py, train.py and lr_find.py train; nothing is downloaded
here (the shapes do not depend on the ImageNet weights)."""
from finegrained import cli
from finegrained import recipe as recipes


def parse_args(argv=None):
    p = cli.parser(__doc__)
    cli.add_recipe(p, resume=False)
    recipes.add_flags(p)
    p.add_argument("--classes", type=int, default=196, help="number of classes (default: 196, Stanford Cars)")
    args = p.parse_args(argv)
    if args.classes < 2:
        p.error(f"--classes must be at least 2, got {args.classes}")
    return args


def main(argv=None):
    args = parse_args(argv)
    where, raw = recipes.load(args.recipe)
    recipe = recipes.resolve(raw, recipes.overrides(args), where)
    from finegrained.models import describe_model  # here, not at the top: --help answers without importing torch
    print("\n".join(describe_model(recipe, args.classes)))


if __name__ == "__main__":
    cli.run(main)
