"""The networks of t2i-repro, in one section per paper. Each section is owned by
the script family that uses it; scripts import from here."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ============================================================================
# Evaluation networks: FID Inception-v3 (pytorch-fid layout), the shapes judge
# ============================================================================
# [section: evaluation]
# The FID Inception-v3 is the TF graph `inception-2015-12-05` as pytorch-fid ports it
# (metrics.md): torchvision's Inception3 module names, so the file
# pt_inception-2015-12-05-6726825d.pth loads with strict=True, and the TF graph's own
# blocks: average pools that ignore padding, a max pool in the last block, 1008 classes.
class InceptionConv(nn.Module):
    """Inception's unit: conv without bias, BatchNorm (eps 1e-3, the TF graph's), ReLU."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def tf_avg_pool(x):
    """The TF graph's 3x3 average pool: padded positions are left out of the mean."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def stem_pool(x):
    return F.max_pool2d(x, 3, stride=2)


class InceptionBlockA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = InceptionConv(cin, 64, kernel_size=1)
        self.branch5x5_1 = InceptionConv(cin, 48, kernel_size=1)
        self.branch5x5_2 = InceptionConv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = InceptionConv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = InceptionConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = InceptionConv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = InceptionConv(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(tf_avg_pool(x))], 1)


class InceptionBlockB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = InceptionConv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = InceptionConv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = InceptionConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = InceptionConv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], 1)


class InceptionBlockC(nn.Module):
    """Mixed_6b..6e (17x17): factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, cin, c7):
        super().__init__()
        h, v = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = InceptionConv(cin, 192, kernel_size=1)
        self.branch7x7_1 = InceptionConv(cin, c7, kernel_size=1)
        self.branch7x7_2 = InceptionConv(c7, c7, **h)
        self.branch7x7_3 = InceptionConv(c7, 192, **v)
        self.branch7x7dbl_1 = InceptionConv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = InceptionConv(c7, c7, **v)
        self.branch7x7dbl_3 = InceptionConv(c7, c7, **h)
        self.branch7x7dbl_4 = InceptionConv(c7, c7, **v)
        self.branch7x7dbl_5 = InceptionConv(c7, 192, **h)
        self.branch_pool = InceptionConv(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = m(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(tf_avg_pool(x))], 1)


class InceptionBlockD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = InceptionConv(cin, 192, kernel_size=1)
        self.branch3x3_2 = InceptionConv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = InceptionConv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = InceptionConv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = InceptionConv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = InceptionConv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionBlockE(nn.Module):
    """Mixed_7b/7c (8x8): expanded 1x3 + 3x1 branches. The TF graph pools with an
    average (padding left out) in Mixed_7b but a max in Mixed_7c (`max_pool=True`)."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = InceptionConv(cin, 320, kernel_size=1)
        self.branch3x3_1 = InceptionConv(cin, 384, kernel_size=1)
        self.branch3x3_2a = InceptionConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = InceptionConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = InceptionConv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = InceptionConv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = InceptionConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = InceptionConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = InceptionConv(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """The FID network. forward(x) takes RGB in [0, 1] at any size, resizes to 299
    (bilinear, align_corners=False) and scales to [-1, 1] as pytorch-fid does, and
    returns the spatially averaged output of the block that gives `dims` features:
    64 (first max pool), 192 (second max pool), 768 (Mixed_6e), 2048 (pool3).
    logits(pool3) are the 1008-way logits without the fc bias, as the original
    Inception Score and torch-fidelity take them (metrics.md)."""

    DIMS = (64, 192, 768, 2048)

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = InceptionConv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = InceptionConv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = InceptionConv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = InceptionConv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = InceptionConv(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionBlockA(192, pool_features=32)
        self.Mixed_5c = InceptionBlockA(256, pool_features=64)
        self.Mixed_5d = InceptionBlockA(288, pool_features=64)
        self.Mixed_6a = InceptionBlockB(288)
        self.Mixed_6b = InceptionBlockC(768, c7=128)
        self.Mixed_6c = InceptionBlockC(768, c7=160)
        self.Mixed_6d = InceptionBlockC(768, c7=160)
        self.Mixed_6e = InceptionBlockC(768, c7=192)
        self.Mixed_7a = InceptionBlockD(768)
        self.Mixed_7b = InceptionBlockE(1280, max_pool=False)
        self.Mixed_7c = InceptionBlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x, dims=2048):
        if dims not in self.DIMS:
            raise ValueError(f"dims={dims}: expected one of {self.DIMS}")
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1
        blocks = [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, stem_pool],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, stem_pool],
            [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
             self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c]]
        for block in blocks[:self.DIMS.index(dims) + 1]:
            for m in block:
                x = m(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def logits(self, pool3):
        return pool3 @ self.fc.weight.t()


# ============================================================================
# Text/image encoders: DAMSM (AttnGAN/DM-GAN), CLIP finetuned, CLIP from scratch
# ============================================================================
# [section: encoders]


# ============================================================================
# DM-GAN (Zhu et al. 2019), conditioned on DAMSM or CLIP text features
# ============================================================================
# [section: dmgan]


# ============================================================================
# XMC-GAN (Zhang et al. 2021)
# ============================================================================
# [section: xmcgan]


# ============================================================================
# DALLE: DiscreteVAE, taming VQGAN, DALLE transformer
# ============================================================================
# [section: dalle]
