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
# Layer widths follow DM-GAN's code (MinfengZhu/DM-GAN, code/model.py); with its
# bird/coco cfgs the parameter counts equal the original's (tests/test_dmgan.py).
class GLU(nn.Module):
    """Gated linear unit over channels: first half * sigmoid(second half)."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


def conv3x3(cin, cout, bias=False):
    return nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)


def up_block(cin, cout):
    """Nearest 2x upsampling, 3x3 conv, BN, GLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode='nearest'), conv3x3(cin, cout * 2),
                         nn.BatchNorm2d(cout * 2), GLU())


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(conv3x3(c, c * 2), nn.BatchNorm2d(c * 2), GLU(),
                                   conv3x3(c, c), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.block(x)


class CANet(nn.Module):
    """Conditioning augmentation (StackGAN): c ~ N(mu(s), diag(exp(logvar(s))))."""

    def __init__(self, text_dim, cond_dim):
        super().__init__()
        self.cond_dim = cond_dim
        self.fc = nn.Linear(text_dim, cond_dim * 4)
        self.glu = GLU()

    def forward(self, sent_emb):
        x = self.glu(self.fc(sent_emb))
        mu, logvar = x[:, :self.cond_dim], x[:, self.cond_dim:]
        c = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return c, mu, logvar


class InitStageG(nn.Module):
    """Initial stage: [c, z] -> 4x4 x ngf -> four up-blocks -> 64x64 x ngf/16."""

    def __init__(self, ngf, in_dim):
        super().__init__()
        self.ngf = ngf
        self.fc = nn.Sequential(nn.Linear(in_dim, ngf * 4 * 4 * 2, bias=False),
                                nn.BatchNorm1d(ngf * 4 * 4 * 2), GLU())
        self.upsample = nn.Sequential(up_block(ngf, ngf // 2), up_block(ngf // 2, ngf // 4),
                                      up_block(ngf // 4, ngf // 8), up_block(ngf // 8, ngf // 16))

    def forward(self, z, c):
        return self.upsample(self.fc(torch.cat([c, z], 1)).view(-1, self.ngf, 4, 4))


class DynamicMemory(nn.Module):
    """DM-GAN's memory refinement (Sec. 3.2): memory writing gated by the image
    (Eq. 3-4), key addressing and value reading (Eq. 5-7), response gate (Eq. 8-9)."""

    def __init__(self, ngf, nef):
        super().__init__()
        self.A = nn.Linear(nef, 1, bias=False)       # word part of the writing gate
        self.B = nn.Linear(ngf, 1, bias=False)       # image part of the writing gate
        self.M_r = nn.Sequential(nn.Conv1d(ngf, ngf * 2, 1), nn.ReLU())
        self.M_w = nn.Sequential(nn.Conv1d(nef, ngf * 2, 1), nn.ReLU())
        self.key = nn.Sequential(nn.Conv1d(ngf * 2, ngf, 1), nn.ReLU())
        self.value = nn.Sequential(nn.Conv1d(ngf * 2, ngf, 1), nn.ReLU())
        self.response_gate = nn.Sequential(nn.Conv2d(ngf * 2, 1, 1), nn.Sigmoid())

    def forward(self, h, words, pad_mask):
        """h: (B, ngf, H, W) image features; words: (B, nef, T); pad_mask: (B, T) True=pad."""
        B, C, H, W = h.shape
        T = words.shape[2]
        h_avg = h.mean((2, 3)).detach()                                         # (B, ngf)
        gate = torch.sigmoid(self.A(words.transpose(1, 2)) + self.B(h_avg)[:, None])  # (B, T, 1)
        gate = gate.transpose(1, 2)                                             # (B, 1, T)
        memory = self.M_w(words) * gate + self.M_r(h_avg[:, :, None].expand(B, C, T)) * (1 - gate)
        key, value = self.key(memory), self.value(memory)                      # (B, ngf, T)
        query = h.flatten(2).transpose(1, 2)                                    # (B, HW, ngf)
        logits = torch.bmm(query, key)                                          # (B, HW, T)
        if pad_mask is not None:
            # Per-sample mask. (The original repeated the mask along the wrong
            # axis, so with batch > 1 each sample got another sample's padding.)
            logits = logits.masked_fill(pad_mask[:, None, :], float('-inf'))
        att = torch.softmax(logits, dim=2)
        read = torch.bmm(value, att.transpose(1, 2)).view(B, C, H, W)
        r = self.response_gate(torch.cat([h, read], 1))
        return h * (1 - r) + read * r, att.transpose(1, 2).reshape(B, T, H, W)


class NextStageG(nn.Module):
    """Refinement stage: dynamic memory, residual blocks, 2x up-block."""

    def __init__(self, ngf, nef, r_num):
        super().__init__()
        self.memory = DynamicMemory(ngf, nef)
        self.residual = nn.Sequential(*[ResBlock(ngf * 2) for _ in range(r_num)])
        self.upsample = up_block(ngf * 2, ngf)

    def forward(self, h, words, pad_mask):
        h, att = self.memory(h, words, pad_mask)
        return self.upsample(self.residual(torch.cat([h, h], 1))), att


class DMGANGenerator(nn.Module):
    """G_NET: CA, initial 64x64 stage, then branch_num - 1 memory stages (128, 256)."""

    def __init__(self, gf_dim=64, z_dim=100, cond_dim=100, text_dim=256, branch_num=3, r_num=2):
        super().__init__()
        self.z_dim = z_dim
        self.ca_net = CANet(text_dim, cond_dim)
        self.init_stage = InitStageG(gf_dim * 16, z_dim + cond_dim)
        self.stages = nn.ModuleList([NextStageG(gf_dim, text_dim, r_num) for _ in range(branch_num - 1)])
        self.img_heads = nn.ModuleList([nn.Sequential(conv3x3(gf_dim, 3), nn.Tanh())
                                        for _ in range(branch_num)])

    def forward(self, z, sent_emb, words_emb, pad_mask):
        """Returns images per stage (in [-1, 1]), attention maps per memory stage, mu, logvar."""
        c, mu, logvar = self.ca_net(sent_emb)
        h = self.init_stage(z, c)
        imgs, atts = [self.img_heads[0](h)], []
        for stage, head in zip(self.stages, self.img_heads[1:]):
            h, att = stage(h, words_emb, pad_mask)
            imgs.append(head(h))
            atts.append(att)
        return imgs, atts, mu, logvar


class SpectralNorm(nn.Module):
    """Spectral normalisation by one power iteration per forward, as DM-GAN's
    spectral.py: the raw weight and the u/v vectors are parameters of the wrapper
    (u, v without gradient), which is what the original's parameter count includes."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        w = module.weight.detach()
        del module._parameters['weight']
        height = w.shape[0]
        self.weight_bar = nn.Parameter(w)
        self.weight_u = nn.Parameter(F.normalize(torch.randn(height), dim=0, eps=1e-12), requires_grad=False)
        self.weight_v = nn.Parameter(F.normalize(torch.randn(w[0].numel()), dim=0, eps=1e-12),
                                     requires_grad=False)

    def forward(self, x):
        w = self.weight_bar.view(self.weight_bar.shape[0], -1)
        if self.training:
            with torch.no_grad():
                v = F.normalize(w.t() @ self.weight_u, dim=0, eps=1e-12)
                self.weight_v.copy_(v)
                self.weight_u.copy_(F.normalize(w @ v, dim=0, eps=1e-12))
        sigma = self.weight_u @ (w @ self.weight_v)
        self.module.weight = self.weight_bar / sigma
        return self.module(x)


def sn_conv(cin, cout, k, s, p):
    return SpectralNorm(nn.Conv2d(cin, cout, k, s, p, bias=True))


class DGetLogits(nn.Module):
    """Unconditional logit from the 4x4 code, or conditional on the sentence code."""

    def __init__(self, ndf, nef, condition):
        super().__init__()
        self.nef = nef
        self.joint = nn.Sequential(sn_conv(ndf * 8 + nef, ndf * 8, 3, 1, 1), nn.LeakyReLU(0.2)) \
            if condition else None
        self.outlogits = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4)

    def forward(self, h, c=None):
        if self.joint is not None:
            h = self.joint(torch.cat([h, c.view(-1, self.nef, 1, 1).expand(-1, -1, 4, 4)], 1))
        return self.outlogits(h).view(-1)       # logits; BCE-with-logits replaces sigmoid + BCE


class DMGANDiscriminator(nn.Module):
    """D_NET64 / D_NET128 / D_NET256: down-sampling to a 4x4 x 8ndf code, then
    unconditional and sentence-conditional logits."""

    def __init__(self, img_size, df_dim=64, text_dim=256):
        super().__init__()
        ndf, lrelu = df_dim, (lambda: nn.LeakyReLU(0.2))
        layers = [sn_conv(3, ndf, 4, 2, 1), lrelu(), sn_conv(ndf, ndf * 2, 4, 2, 1), lrelu(),
                  sn_conv(ndf * 2, ndf * 4, 4, 2, 1), lrelu(), sn_conv(ndf * 4, ndf * 8, 4, 2, 1), lrelu()]
        extra = int(math.log2(img_size // 64))          # 0 / 1 / 2 more down-blocks
        c = ndf * 8
        for _ in range(extra):
            layers += [sn_conv(c, c * 2, 4, 2, 1), lrelu()]
            c *= 2
        for _ in range(extra):                          # 3x3 blocks back to 8 ndf
            layers += [sn_conv(c, c // 2, 3, 1, 1), lrelu()]
            c //= 2
        self.img_code = nn.Sequential(*layers)
        self.uncond = DGetLogits(ndf, text_dim, condition=False)
        self.cond = DGetLogits(ndf, text_dim, condition=True)

    def forward(self, x):
        return self.img_code(x)


# ============================================================================
# XMC-GAN (Zhang et al. 2021)
# ============================================================================
# [section: xmcgan]


# ============================================================================
# DALLE: DiscreteVAE, taming VQGAN, DALLE transformer
# ============================================================================
# [section: dalle]
