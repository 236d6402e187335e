"""Heads: the classifier put on a backbone's feature map, chosen by `--head`.

    concat    fastai's head (concat avg+max pool, BN, dropout, 512, ReLU, BN, dropout, n_out): the default
    linear    fastai's add_head set up as torchvision's: average pool, one linear layer
    bilinear  symmetric bilinear CNN (B-CNN, as in the FGVC-Aircraft write-up): 1x1 reduction, outer product averaged over
              locations, signed square root, L2 normalization, dropout, linear classifier
    localize  the concat head plus a box head that keeps the feature map's layout (1x1 conv, a box_grid x box_grid
              average pool, flattened, two linear layers); forward returns (class logits, box), the box as
              x1, y1, x2, y2 in fastai's normalized frame of the input image (-1..1, as TensorBBox after PointScaler)

`make_head(kind, body, n_out, **options)` returns nn.Sequential(body, head), so that fastai's splitters
(model[0] the body, model[1:] the head) and `Learner.freeze` treat every head alike: the head is always
the last parameter group. The body is fastai's: `create_body(torchvision_model, cut=-2)` for torchvision,
`TimmBody` (= `create_timm_model(name, n_out)[0][0]`) for timm."""
import torch
import torch.nn.functional as F
from fastai.layers import ConvLayer
from fastai.torch_core import apply_init
from fastai.vision.learner import add_head, create_head, num_features_model, TimmBody
from torch import nn

from finegrained.errors import UserError

FASTAI_HEADS = {  # heads that are fastai's add_head with these arguments
    "concat": {},
    "linear": dict(concat_pool=False, lin_ftrs=[], first_bn=False, ps=0.0),
}
HEADS = (*FASTAI_HEADS, "bilinear", "localize")
OPTIONS = {**{k: {} for k in FASTAI_HEADS}, "bilinear": {"bilinear_dim": 512, "dropout": 0.5},
           "localize": {"box_dropout": 0.1, "box_grid": 4}}
BOX_PRIOR = (-0.5, -0.5, 0.5, 0.5)  # what an untrained box head predicts: the centred box of half the width and height
BOX_CHANNELS, BOX_HIDDEN = 128, 256


class BilinearPool(nn.Module):
    """(B, C, H, W) feature map -> (B, D*D) bilinear features with unit L2 norm, D = bilinear_dim or C.

    Written by hand: neither fastai, timm nor torchvision has second-order (bilinear) pooling.
    The 1x1 reduction is fastai's ConvLayer (conv, BatchNorm, ReLU); without it D = C, and the
    classifier after it has C*C inputs (4.2 M for a 2048-channel ResNet50)."""

    def __init__(self, in_ch, bilinear_dim=512, eps=1e-5):
        super().__init__()
        self.reduce = ConvLayer(in_ch, bilinear_dim, ks=1) if bilinear_dim else nn.Identity()
        self.channels = bilinear_dim or in_ch
        self.out_features, self.eps = self.channels ** 2, eps

    def forward(self, x):
        x = self.reduce(x)
        # in fp32 even under mixed precision: a sum of H*W products, then a square root near 0
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float().flatten(2)                                 # (B, D, L)
            gram = torch.bmm(x, x.transpose(1, 2)) / x.shape[2]      # outer product averaged over the L locations
            y = gram.flatten(1)
            y = torch.sign(y) * torch.sqrt(y.abs() + self.eps)       # signed square root (eps: finite gradient at 0)
            return F.normalize(y, dim=1)


def bilinear_head(n_features, n_out, bilinear_dim=512, dropout=0.5):
    """BilinearPool, dropout, linear classifier: model[1] of a bilinear model (model[1][0] is the pool)."""
    pool = BilinearPool(n_features, bilinear_dim)
    return nn.Sequential(pool, nn.Dropout(dropout), nn.Linear(pool.out_features, n_out))


def order_corners(box):
    """x1 <= x2 and y1 <= y2 for any 4 outputs, so the IoU and GIoU of a prediction are always defined."""
    return torch.cat([torch.minimum(box[..., :2], box[..., 2:]), torch.maximum(box[..., :2], box[..., 2:])], dim=-1)


class LocalizeHead(nn.Module):
    """Feature map -> (class logits, box): fastai's concat head for the classes, and a box head on the same features.

    The box head is written here rather than taken from fastai's create_head, because on generated toy cars
    (resnet18 from scratch, 64 px, 12-15 epochs of one-cycle) create_head did worse than a fixed box: its global
    pooling keeps too little of where things are (mean IoU 0.40-0.47, where one fixed centred box gets 0.66), and its
    SigmoidRange output saturated at the frame's edges under one-cycle's peak rate and stayed there (IoU stuck at the
    whole frame's 0.40 for epochs). So: a 1x1 ConvLayer to BOX_CHANNELS, an average pool to a box_grid x box_grid grid
    that keeps the layout, flattened, dropout, two linear layers and a plain linear output (clipped to the frame
    only where it is scored), the last layer starting at zero weights and BOX_PRIOR. Validation mean IoU there:
    0.50 with SigmoidRange, 0.73 with the linear output, 0.76 starting at BOX_PRIOR."""

    def __init__(self, n_features, n_out, pool=True, box_dropout=0.1, box_grid=4):
        super().__init__()
        self.cls = create_head(n_features, n_out, pool=pool)
        self.box = nn.Sequential(ConvLayer(n_features, BOX_CHANNELS, ks=1), nn.AdaptiveAvgPool2d(box_grid), nn.Flatten(),
                                 nn.Dropout(box_dropout), nn.Linear(BOX_CHANNELS * box_grid ** 2, BOX_HIDDEN),
                                 nn.ReLU(inplace=True), nn.Linear(BOX_HIDDEN, 4))

    def reset_box_output(self):
        """The last layer at zero weights and BOX_PRIOR: every image starts at a sensible box, and neither loss
        starts from a box far outside the frame, where GIoU's gradient all but vanishes."""
        last = self.box[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor(BOX_PRIOR))

    def forward(self, x):
        return self.cls(x), order_corners(self.box(x))


def n_features(body):
    """Channels of the body's output: timm's `num_features` for a TimmBody, else fastai's num_features_model."""
    if isinstance(body, TimmBody):
        return body.model.num_features
    training = body.training
    nf = num_features_model(body)  # a dummy forward pass, which leaves the body in eval mode
    body.train(training)
    return nf


def _check_feature_map(kind, body):
    """bilinear and localize need a (B, C, H, W) map: timm models without one (ViTs) or channels-last (Swin) are refused."""
    if not isinstance(body, TimmBody):
        return
    name = body.model.default_cfg.get("architecture", type(body.model).__name__)
    fmt = str(getattr(body.model, "output_fmt", "NCHW"))
    if not body.needs_pool or "NCHW" not in fmt:
        raise UserError(f"--head {kind} needs a (batch, channels, height, width) feature map, and timm's {name} "
                        f"gives {'pooled features' if not body.needs_pool else fmt}: use --head concat or a CNN backbone")


def make_head(kind, body, n_out, **options):
    """nn.Sequential(body, head) for `kind` in HEADS; `options` as in OPTIONS (unknown ones are refused).

    The head is initialised as fastai's add_head does (kaiming normal, BatchNorm left as is)."""
    if kind not in HEADS:
        raise UserError(f"unknown head {kind!r}: choose one of {', '.join(HEADS)}")
    unknown = sorted(set(options) - set(OPTIONS[kind]))
    if unknown:
        raise UserError(f"head {kind!r} takes no option {unknown[0]!r} (it takes: {', '.join(OPTIONS[kind]) or 'none'})")
    opts = {**OPTIONS[kind], **options}
    if int(n_out) < 1:
        raise UserError(f"a model needs at least one class, got {n_out}")
    pool = body.needs_pool if isinstance(body, TimmBody) else True  # as fastai's create_timm_model
    nf = n_features(body)
    if kind in FASTAI_HEADS:
        return add_head(body, nf, n_out, pool=pool, **FASTAI_HEADS[kind])
    _check_feature_map(kind, body)
    if kind == "bilinear":
        if opts["bilinear_dim"] is not None and int(opts["bilinear_dim"]) < 1:
            raise UserError(f"bilinear_dim: the 1x1 reduction needs a positive number of channels (or none), "
                            f"got {opts['bilinear_dim']}")
        if not 0 <= opts["dropout"] < 1:
            raise UserError(f"dropout must be in [0, 1), got {opts['dropout']}")
        head = bilinear_head(nf, n_out, opts["bilinear_dim"], opts["dropout"])
    else:
        if not 0 <= opts["box_dropout"] < 1 or int(opts["box_grid"]) < 1:
            raise UserError(f"box_dropout must be in [0, 1) and box_grid at least 1, got {opts['box_dropout']}, {opts['box_grid']}")
        head = LocalizeHead(nf, n_out, pool, opts["box_dropout"], int(opts["box_grid"]))
    apply_init(head, nn.init.kaiming_normal_)
    if kind == "localize":
        head.reset_box_output()  # after apply_init, which would draw it again
    return nn.Sequential(body, head)

