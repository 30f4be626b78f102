"""A random-init FID Inception in pytorch-fid's weights format, for parity tests and
benchmarks where the real pt_inception-2015-12-05-6726825d.pth cannot be downloaded."""

import torch

import models


def calibrated_random_weights(images, path, seed=0):
    """Random weights whose BatchNorm running statistics are the batch statistics of
    `images` (RGB in [0, 1], (N, 3, H, W)), so every layer's features vary across
    images instead of collapsing; written as a plain state dict like pytorch-fid's file."""
    torch.manual_seed(seed)
    net = models.FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: exactly this batch's statistics
    net.train()
    with torch.no_grad():
        net(images)
    torch.save(net.state_dict(), path)
    return path
