"""A small ResNet with GroupNorm for 1 x 28 x 28 images (PneumoniaMNIST).

BatchNorm mixes statistics across the samples of a batch, which breaks the
per-sample gradients that DP-SGD clips, so every normalization here is
GroupNorm; the network passes Opacus' strict module validator. The channel
widths grow with depth (few channels at 28 x 28, more at 7 x 7) because the
cost of per-sample gradients of a convolution grows with its output area.
"""

import torch
from torch import nn

from medfed.contract.models import check_positive_int, register_model

__all__ = ["BasicBlock", "ResNetGN"]


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class BasicBlock(nn.Module):
    """Two 3 x 3 convolutions with a residual connection.

    A 1 x 1 convolution projects the shortcut when the stride or the width
    changes.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int, groups: int
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, 3, stride=stride, padding=1, bias=False
        )
        self.norm1 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels, groups)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                _group_norm(out_channels, groups),
            )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.norm1(self.conv1(inputs)))
        hidden = self.norm2(self.conv2(hidden))
        return self.act(hidden + self.shortcut(inputs))


@register_model("resnet_gn")
class ResNetGN(nn.Module):
    """ResNet-style binary classifier for single-channel 28 x 28 images.

    A stem convolution at 28 x 28 is followed by one residual block per
    width in ``widths``; every block after the first halves the resolution
    (28 -> 14 -> 7 with three widths). Global average pooling and one linear
    layer give the logit.

    Args:
        in_channels: image channels (1 for chest X-rays).
        widths: channels of the stem and of each residual stage.
        groups: GroupNorm groups per layer (capped at the layer's channels).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        widths: tuple[int, ...] | list[int] = (16, 32, 64),
        groups: int = 8,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        # A string is a sequence too, and tuple("16") would be ("1", "6").
        if not isinstance(widths, tuple | list) or not widths:
            raise ValueError(
                f"widths must be a non-empty list of channel counts, got {widths!r}"
            )
        widths = tuple(widths)
        for width in widths:
            check_positive_int("each entry of widths", width)
        check_positive_int("groups", groups)
        for width in widths:
            if width % min(groups, width):
                raise ValueError(
                    f"every width must be divisible by groups={groups}, got {widths}"
                )
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            _group_norm(widths[0], groups),
            nn.ReLU(),
        )
        blocks = []
        previous = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks.append(BasicBlock(previous, width, stride=stride, groups=groups))
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(previous, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch,) for images of shape (batch, C, H, W)."""
        hidden = self.blocks(self.stem(images))
        return self.head(self.pool(hidden).flatten(1)).squeeze(-1)
