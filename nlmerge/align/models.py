"""Small plain-torch models whose permutation specs the builders in ``nlmerge.align.specs`` give.

Every size argument is an int >= 1 (TypeError / ValueError naming it otherwise).
"""
import torch
from torch import nn

from nlmerge.align.spec import check_int


def _sizes(values, name, least):
    """``values`` as a list of at least ``least`` ints >= 1, each checked under ``name[i]``."""
    values = list(values)
    if len(values) < least:
        raise ValueError(f"{name} needs at least {least} entries, got {values}")
    return [check_int(v, f"{name}[{i}]", 1) for i, v in enumerate(values)]


class MLP(nn.Sequential):
    """``Linear, ReLU, ..., Linear`` over ``sizes = (in, hidden..., out)``: Linear k is module ``2k``."""

    def __init__(self, sizes):
        sizes = _sizes(sizes, "sizes", 2)
        layers = []
        for k in range(len(sizes) - 1):
            if k:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(sizes[k], sizes[k + 1]))
        super().__init__(*layers)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of ``[N, C, H, W]`` (per position)."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class CNN(nn.Module):
    """``features`` = ``[Conv3x3, norm, ReLU]`` per width (no norm: ``[Conv3x3, ReLU]``), then global
    average pooling and ``head`` (Linear).

    Parameters
    ----------
    in_channels : int
    widths : sequence of int
    num_classes : int
    norm : {"batch", "layer", None}
    """

    def __init__(self, in_channels=3, widths=(8, 16), num_classes=10, norm="batch"):
        super().__init__()
        if norm not in ("batch", "layer", None):
            raise ValueError(f"norm must be 'batch', 'layer' or None, got {norm!r}")
        widths = _sizes(widths, "widths", 1)
        num_classes = check_int(num_classes, "num_classes", 1)
        layers, c = [], check_int(in_channels, "in_channels", 1)
        for w in widths:
            layers.append(nn.Conv2d(c, w, 3, padding=1))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(w))
            elif norm == "layer":
                layers.append(ChannelLayerNorm(w))
            layers.append(nn.ReLU())
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """``act2(bn2(conv2(act1(bn1(conv1 x)))) + shortcut(x))``; ``shortcut`` = 1x1 conv + BN when the
    width or stride changes, else identity."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet(nn.Module):
    """``stem`` (conv, BN, ReLU at ``widths[0]``), ``stages[s][b]`` basic blocks (the first block of
    every stage but the first has stride 2 and a conv shortcut), global pooling, ``head``."""

    def __init__(self, in_channels=3, widths=(8, 16), blocks_per_stage=2, num_classes=10):
        super().__init__()
        in_channels, num_classes = check_int(in_channels, "in_channels", 1), check_int(num_classes, "num_classes", 1)
        widths, blocks_per_stage = _sizes(widths, "widths", 1), check_int(blocks_per_stage, "blocks_per_stage", 1)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c = [], widths[0]
        for s, w in enumerate(widths):
            blocks = [BasicBlock(c if b == 0 else w, w, stride=2 if (s and b == 0) else 1)
                      for b in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            c = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``proj`` Linears."""

    def __init__(self, dim, heads):
        super().__init__()
        dim, heads = check_int(dim, "dim", 1), check_int(heads, "heads", 1)
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1 x)``, then ``x + mlp(norm2 x)`` (fc1, GELU, fc2)."""

    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer: ``patch_embed`` (conv), ``cls_token``, ``pos_embed``, ``blocks``, final
    ``norm`` and ``head`` on the class token."""

    def __init__(self, image_size=8, patch_size=4, in_channels=3, dim=16, depth=2, heads=4, mlp_dim=32,
                 num_classes=10):
        super().__init__()
        image_size, patch_size, in_channels, dim, depth, mlp_dim, num_classes = (
            check_int(v, n, 1) for v, n in ((image_size, "image_size"), (patch_size, "patch_size"),
                                            (in_channels, "in_channels"), (dim, "dim"), (depth, "depth"),
                                            (mlp_dim, "mlp_dim"), (num_classes, "num_classes")))
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
