"""A fixed wavelet scattering front end with a linear classifier (ScatterNet).

Tramer and Boneh ("Differentially Private Learning Needs Better Features (or
Much More Data)", ICLR 2021) trained a linear model on normalized scattering
features under DP-SGD. On MNIST-like images it beat end-to-end CNNs at the
same epsilon, because the scattering transform has no trainable parameters
and DP noise is spread over a few thousand weights instead of tens of
thousands.

``Scattering2D`` computes the second-order 2D scattering transform of Bruna
and Mallat with Morlet wavelets, following the filter bank and algorithm of
kymatio 0.3.0 (BSD-3-Clause): reflect padding, products in the Fourier
domain, subsampling by periodizing the spectrum. It is written here in torch
because kymatio 0.3.0 cannot be imported with scipy 1.17, which removed
``scipy.special.sph_harm`` that kymatio's 3D module imports. Its filters are
non-persistent buffers, so they are not part of the state dict and never
leave a site.
"""

import math

import numpy as np
import torch
from torch import nn

from medfed.contract.models import check_positive_int, register_model

__all__ = ["ScatterLinear", "Scattering2D", "scattering_channels"]


def scattering_channels(scales: int, orientations: int) -> int:
    """Return the channels per input channel of a second-order scattering."""
    return 1 + scales * orientations + orientations**2 * scales * (scales - 1) // 2


def _gabor(
    size: tuple[int, int], sigma: float, theta: float, xi: float, slant: float
) -> np.ndarray:
    """Return a Gabor filter on a periodic grid, summed over 5 x 5 periods."""
    rows, cols = size
    rotation = np.array(
        [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    )
    scaling = np.diag([1.0, slant * slant])
    curvature = rotation @ scaling @ rotation.T / (2 * sigma * sigma)
    gabor = np.zeros(size, np.complex128)
    for shift_x in range(-2, 3):
        for shift_y in range(-2, 3):
            xx, yy = np.mgrid[
                shift_x * rows : (shift_x + 1) * rows,
                shift_y * cols : (shift_y + 1) * cols,
            ]
            envelope = -(
                curvature[0, 0] * xx * xx
                + (curvature[0, 1] + curvature[1, 0]) * xx * yy
                + curvature[1, 1] * yy * yy
            )
            carrier = xx * math.cos(theta) * xi + yy * math.sin(theta) * xi
            gabor += np.exp(envelope + 1j * carrier)
    # kymatio 0.3.0 divides by pi rounded to 3.1415, and so does this, so the
    # filters match.
    return gabor / (2 * 3.1415 * sigma * sigma / slant)


def _morlet(
    size: tuple[int, int], sigma: float, theta: float, xi: float, slant: float
) -> np.ndarray:
    """Return a Gabor filter minus the Gaussian that makes its mean zero."""
    wave = _gabor(size, sigma, theta, xi, slant)
    modulus = _gabor(size, sigma, theta, 0.0, slant)
    return wave - modulus * (wave.sum() / modulus.sum())


def _periodize(spectrum: np.ndarray, level: int) -> np.ndarray:
    """Return the spectrum of a filter for signals subsampled by ``2**level``.

    Frequencies above the new Nyquist band are zeroed and the rest is folded
    onto the smaller grid.
    """
    rows, cols = spectrum.shape
    factor = 2**level
    masked = spectrum.copy()
    start_x, length_x = int(rows * 2 ** (-level - 1)), int(rows * (1 - 2**-level))
    start_y, length_y = int(cols * 2 ** (-level - 1)), int(cols * (1 - 2**-level))
    masked[start_x : start_x + length_x, :] = 0
    masked[:, start_y : start_y + length_y] = 0
    folded = masked.reshape(factor, rows // factor, factor, cols // factor)
    return folded.sum(axis=(0, 2))


#: Images per pass of the transform.
_CHUNK = 256


def _subsample_fourier(spectrum: torch.Tensor, factor: int) -> torch.Tensor:
    """Return the spectrum of the signal subsampled by ``factor`` in space."""
    if factor == 1:
        return spectrum
    *batch, rows, cols = spectrum.shape
    folded = spectrum.reshape(*batch, factor, rows // factor, factor, cols // factor)
    # Two single-axis means, because one mean over both axes of a complex
    # tensor took about 3 times as long (torch 2.13, 2-core x86 CPU).
    return folded.mean(dim=-2).mean(dim=-3)


class Scattering2D(nn.Module):
    """Second-order 2D scattering transform with Morlet wavelets, no parameters.

    Maps images (batch, C, H, W) to (batch, C * K, H / 2**J, W / 2**J) with
    ``K = scattering_channels(J, L)``. The K channels are one low-pass
    channel, J * L first-order and L**2 * J * (J - 1) / 2 second-order
    channels, in kymatio's order. For J = 2 and L = 8 on 28 x 28 images that
    is 81 channels of 7 x 7.

    Args:
        shape: image height and width, each a multiple of ``2**scales``.
        scales: J, the number of dyadic scales (the spatial subsampling is
            ``2**J``).
        orientations: L, the number of wavelet angles.
    """

    def __init__(
        self, shape: tuple[int, int], *, scales: int = 2, orientations: int = 8
    ) -> None:
        super().__init__()
        check_positive_int("scales", scales)
        check_positive_int("orientations", orientations)
        height = check_positive_int("image height", shape[0])
        width = check_positive_int("image width", shape[1])
        # 2**scales exceeds the smaller side exactly when scales reaches the
        # side's bit length. Checked first, so a huge scales never computes
        # 2**scales.
        if scales >= min(height, width).bit_length():
            raise ValueError(
                f"image shape {tuple(shape)} is smaller than 2**scales = "
                f"2**{scales} pixels per side; lower scales"
            )
        factor = 2**scales
        if height % factor or width % factor or height < factor or width < factor:
            raise ValueError(
                f"image shape {tuple(shape)} must be a multiple of 2**scales = {factor}"
            )
        self.shape = (height, width)
        self.scales = scales
        self.orientations = orientations

        # Padded size as in kymatio: the next multiple of 2**J above H + 2**J.
        padded = tuple(((side + factor) // factor + 1) * factor for side in shape)
        self.padding = (
            (padded[1] - width) // 2,
            (padded[1] - width + 1) // 2,
            (padded[0] - height) // 2,
            (padded[0] - height + 1) // 2,
        )
        if max(self.padding) >= min(height, width):
            raise ValueError(
                f"image shape {tuple(shape)} is too small for scales={scales}; "
                "reflect padding needs images larger than the padding"
            )

        size = (padded[0], padded[1])
        low_pass = np.real(np.fft.fft2(_gabor(size, 0.8 * 2 ** (scales - 1), 0, 0, 1)))
        for level in range(scales):
            self._add_filter(f"low_pass_{level}", _periodize(low_pass, level))

        levels = max(scales - 1, 1)
        for scale in range(scales):
            for angle in range(orientations):
                theta = (int(orientations - orientations / 2 - 1) - angle) * math.pi
                wavelet = _morlet(
                    size,
                    0.8 * 2**scale,
                    theta / orientations,
                    3.0 / 4.0 * math.pi / 2**scale,
                    4.0 / orientations,
                )
                spectrum = np.real(np.fft.fft2(wavelet))
                for level in range(min(scale + 1, levels)):
                    name = f"wavelet_{scale}_{angle}_{level}"
                    self._add_filter(name, _periodize(spectrum, level))

    def _add_filter(self, name: str, spectrum: np.ndarray) -> None:
        self.register_buffer(
            name, torch.from_numpy(spectrum.astype(np.float32)), persistent=False
        )

    def _filter(self, name: str) -> torch.Tensor:
        buffer = getattr(self, name)
        assert isinstance(buffer, torch.Tensor)
        return buffer

    def _wavelets(self, scale: int, level: int) -> torch.Tensor:
        """Return the L wavelets of ``scale`` at ``level``, shape (L, H', W')."""
        return torch.stack(
            [
                self._filter(f"wavelet_{scale}_{angle}_{level}")
                for angle in range(self.orientations)
            ]
        )

    def _low_pass(self, spectrum: torch.Tensor, level: int) -> torch.Tensor:
        """Return the low-passed, subsampled, unpadded real signal."""
        filtered = spectrum * self._filter(f"low_pass_{level}")
        filtered = _subsample_fourier(filtered, 2 ** (self.scales - level))
        return torch.fft.ifft2(filtered).real[..., 1:-1, 1:-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return scattering coefficients of shape (batch, C * K, H', W')."""
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.shape:
            raise ValueError(
                f"expected images of shape (batch, channels, {self.shape[0]}, "
                f"{self.shape[1]}), got {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            channels = images.shape[1] * scattering_channels(
                self.scales, self.orientations
            )
            side = 2**self.scales
            return images.new_zeros(
                0, channels, self.shape[0] // side, self.shape[1] // side
            )
        # Chunks bound the memory of the complex intermediates. For 28 x 28
        # images the first-order spectra alone take 83 kB per image and channel.
        chunks = [
            self._transform(images[start : start + _CHUNK])
            for start in range(0, images.shape[0], _CHUNK)
        ]
        return torch.cat(chunks)

    def _transform(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        padded = nn.functional.pad(images, self.padding, mode="reflect")
        # spectrum: (batch, channels, H, W), complex
        spectrum = torch.fft.fft2(padded.to(torch.complex64))
        zeroth = [self._low_pass(spectrum, 0).unsqueeze(2)]
        first_order: list[torch.Tensor] = []
        second_order: list[torch.Tensor] = []
        for scale in range(self.scales):
            # (batch, channels, L, H / 2**scale, W / 2**scale)
            first = spectrum.unsqueeze(2) * self._wavelets(scale, 0)
            first = _subsample_fourier(first, 2**scale)
            first = torch.fft.fft2(torch.fft.ifft2(first).abs().to(torch.complex64))
            first_order.append(self._low_pass(first, scale))
            # kymatio's order: by the first wavelet (scale, angle), then by
            # the second (scale, angle). One first angle at a time keeps the
            # products to L images per record.
            for angle in range(self.orientations):
                for outer in range(scale + 1, self.scales):
                    product = first[:, :, angle : angle + 1] * self._wavelets(
                        outer, scale
                    )
                    product = _subsample_fourier(product, 2 ** (outer - scale))
                    modulus = torch.fft.ifft2(product).abs().to(torch.complex64)
                    second_order.append(self._low_pass(torch.fft.fft2(modulus), outer))
        coefficients = torch.cat(zeroth + first_order + second_order, dim=2)
        return coefficients.reshape(batch, -1, *coefficients.shape[-2:])


@register_model("scatter_gn")
class ScatterLinear(nn.Module):
    """A linear classifier on GroupNorm-normalized scattering features.

    The scattering front end and the GroupNorm (without affine parameters)
    have nothing to train, so the only trainable layer is the final linear
    layer: 3,970 weights for 28 x 28 single-channel images with the defaults.

    Args:
        in_channels: image channels (1 for chest X-rays).
        image_size: image height and width in pixels.
        scales: J of the scattering transform.
        orientations: L of the scattering transform.
        groups: GroupNorm groups over the scattering channels; each group is
            normalized per sample to zero mean and unit variance.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        scales: int = 2,
        orientations: int = 8,
        groups: int = 9,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("image_size", image_size)
        check_positive_int("groups", groups)
        self.scattering = Scattering2D(
            (image_size, image_size), scales=scales, orientations=orientations
        )
        channels = in_channels * scattering_channels(scales, orientations)
        if channels % groups:
            raise ValueError(
                f"groups must be a positive divisor of the {channels} scattering "
                f"channels, got {groups}"
            )
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        side = image_size // 2**scales
        self.head = nn.Linear(channels * side * side, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch,) for images of shape (batch, C, H, W)."""
        with torch.no_grad():
            features = self.scattering(images)
        return self.head(self.norm(features).flatten(1)).squeeze(-1)
