"""Stage A: the Paella f4 VQGAN. Stage B works in its latent space divided by scale_factor."""

import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .common import GELU, LN_EPS, run_unit, state_shape

SCALE = 2  # up_down_scale_factor: not recoverable from the weights (only channels * scale**2 is)

# names of the old `VQModelPaella` hub config -> current PaellaVQModel names
_OLD_NAMES = {"c_hidden": "embed_dim", "c_latent": "latent_channels", "codebook_size": "num_vq_embeddings"}


@dataclass(frozen=True)
class VQGANConfig:
    in_channels: int = 3
    out_channels: int = 3
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384  # width of the deepest level; level i has embed_dim / 2**(levels-1-i)
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764
    up_down_scale_factor: int = 2

    @classmethod
    def from_state_dict(cls, sd) -> "VQGANConfig":
        """Infer the config from tensor names and shapes; scale_factor is not stored in the
        weights (0.3764 for every public checkpoint) and up_down_scale_factor is taken as 2."""
        in_ch = state_shape(sd, "in_block.1.weight", "VQGAN")[1] // SCALE**2
        out_ch = state_shape(sd, "out_block.0.weight", "VQGAN")[0] // SCALE**2
        num_vq, latent = state_shape(sd, "vquantizer.embedding.weight", "VQGAN")
        last = max(int(m[1]) for k in sd if (m := re.match(r"down_blocks\.(\d+)\.", k)))  # the conv+BN block
        levels = (last + 1) // 2
        embed_dim = state_shape(sd, f"down_blocks.{last}.0.weight", "VQGAN")[1]
        up_mixers = sum(bool(re.fullmatch(r"up_blocks\.\d+\.gammas", k)) for k in sd)
        return cls(in_channels=in_ch, out_channels=out_ch, levels=levels, bottleneck_blocks=up_mixers - (levels - 1),
                   embed_dim=embed_dim, latent_channels=latent, num_vq_embeddings=num_vq, up_down_scale_factor=SCALE)

    @classmethod
    def from_diffusers(cls, config: dict) -> "VQGANConfig":
        """From a PaellaVQModel config.json dict, or an old VQModelPaella one (c_hidden, c_latent,
        codebook_size); unknown keys are ignored and missing keys take the defaults."""
        names = {f.name for f in fields(cls)}
        kw = {_OLD_NAMES.get(k, k): v for k, v in config.items()}
        try:
            return cls(**{k: float(v) if k == "scale_factor" else int(v) for k, v in kw.items() if k in names})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"VQGAN config.json has an invalid value ({e}); expected numbers.") from None


class ReplicationPad(nn.Module):
    """nn.ReplicationPad2d(p) written as copies into a new map of x's memory layout: the same values.
    PyTorch's CUDA replication-pad kernel walks one channel's plane per thread block, so on channels_last
    maps its neighbouring threads touch addresses C elements apart; these copies run along the channels."""

    def __init__(self, p: int):
        super().__init__()
        self.p = p

    def forward(self, x):  # [B,C,H,W] -> [B,C,H+2p,W+2p]
        p, (b, c, h, w) = self.p, x.shape
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        out = torch.empty((b, c, h + 2 * p, w + 2 * p), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        rows = out[:, :, p:p + h]
        rows[..., p:p + w] = x
        rows[..., :p] = x[..., :1]  # left and right columns, broadcast
        rows[..., p + w:] = x[..., -1:]
        out[:, :, :p] = out[:, :, p:p + 1]  # top and bottom rows, corners included
        out[:, :, p + h:] = out[:, :, p + h - 1:p + h]
        return out


class MixingResidualBlock(nn.Module):
    """Paella block: gated depthwise (replication padded) and channelwise residual updates.

    The channelwise update is per pixel, so on large maps it runs over bands of rows of one image at a
    time (at most MAX_TOKENS pixels): its 4×-wide hidden tensors are what made a 1024 px decode peak at
    1 GiB of activations. Bands never span two images, so a batch still equals its single runs."""

    MAX_TOKENS = 2**15

    def __init__(self, c):
        super().__init__()
        self.depthwise = nn.Sequential(ReplicationPad(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.channelwise = nn.Sequential(nn.Linear(c, c * 4), GELU(), nn.Linear(c * 4, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def _norm(self, x, scale, shift):  # NHWC x: LN(x) * (1 + scale) + shift as the LN's own affine
        c = x.shape[-1:]
        return F.layer_norm(x, c, (1 + scale).expand(c), shift.expand(c), eps=LN_EPS)

    def _mix_channels(self, x, out=None):  # x [..., C] NHWC -> x + MLP(norm(x)) * gamma (into `out` if given)
        g = self.gammas
        return torch.addcmul(x, self.channelwise(self._norm(x, g[3], g[4])), g[5], out=out)

    def forward(self, x):  # x [B,C,H,W], copy-free in channels_last memory
        g = self.gammas
        x = torch.addcmul(x, self.depthwise(self._norm(x.permute(0, 2, 3, 1), g[0], g[1]).permute(0, 3, 1, 2)), g[2])
        nhwc = x.permute(0, 2, 3, 1)
        rows = max(1, self.MAX_TOKENS // x.shape[-1])
        if x.shape[-2] <= rows:
            return self._mix_channels(nhwc).permute(0, 3, 1, 2)
        if torch.compiler.is_compiling():
            # traced, the out= bands below would become a copy of the whole map per band; a cat is written
            # in place (each band's last op stores straight into its slice of the output)
            b, h, w, c = nhwc.shape
            bands = [self._mix_channels(nhwc[i, top:top + rows]) for i in range(b) for top in range(0, h, rows)]
            return torch.cat(bands).view(b, h, w, c).permute(0, 3, 1, 2)
        out = torch.empty_like(nhwc)
        for b in range(x.shape[0]):
            for top in range(0, x.shape[-2], rows):
                self._mix_channels(nhwc[b, top:top + rows], out=out[b, top:top + rows])  # no copy
        return out.permute(0, 3, 1, 2)


class PaellaVQGAN(nn.Module):
    """Images in [0, 1] <-> Stage B latents (BatchNorm output / scale_factor). Keep in eval mode:
    the encoder ends in a BatchNorm2d that must use its running statistics."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        s, n = cfg.up_down_scale_factor, cfg.levels
        c_levels = [cfg.embed_dim // 2**i for i in reversed(range(n))]  # shallow -> deep
        self.in_block = nn.Sequential(nn.PixelUnshuffle(s), nn.Conv2d(cfg.in_channels * s**2, c_levels[0], 1))
        down = []
        for i, c in enumerate(c_levels):
            if i:
                down.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
            down.append(MixingResidualBlock(c))
        down.append(nn.Sequential(nn.Conv2d(c_levels[-1], cfg.latent_channels, 1, bias=False),
                                  nn.BatchNorm2d(cfg.latent_channels)))
        self.down_blocks = nn.Sequential(*down)
        # codebook, kept for key parity: decoding never quantises
        self.vquantizer = nn.ModuleDict({"embedding": nn.Embedding(cfg.num_vq_embeddings, cfg.latent_channels)})
        up = [nn.Sequential(nn.Conv2d(cfg.latent_channels, c_levels[-1], 1))]
        for i in reversed(range(n)):
            up.extend(MixingResidualBlock(c_levels[i]) for _ in range(cfg.bottleneck_blocks if i == n - 1 else 1))
            if i:
                up.append(nn.ConvTranspose2d(c_levels[i], c_levels[i - 1], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], cfg.out_channels * s**2, 1), nn.PixelShuffle(s))

    def encode(self, img):
        """img [B,3,H,W] in [0,1] -> Stage B latent [B,latent_channels,H/4,W/4] (unquantised)."""
        h = self.in_block(img.contiguous(memory_format=torch.channels_last))  # see MixingResidualBlock
        return self.down_blocks(h).contiguous() / self.cfg.scale_factor

    def decode(self, latent, run_unit=run_unit):
        """Stage B latent -> image, roughly in [0,1] but not clamped (the caller clamps).
        run_unit runs each MixingResidualBlock (fast mode passes its compiled one)."""
        h = (latent * self.cfg.scale_factor).contiguous(memory_format=torch.channels_last)
        for layer in self.up_blocks:
            h = run_unit((layer,), h, ((),)) if isinstance(layer, MixingResidualBlock) else layer(h)
        return self.out_block(h).contiguous()
