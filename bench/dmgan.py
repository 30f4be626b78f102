"""DM-GAN training-step speed at the original bird cfg (cfg/bird_DMGAN.yml: batch 10, three
stages to 256 px, DF 32 / GF 64, R_NUM 2; DAMSM Inception-v3 image encoder at 299 px, frozen):
images/s of a full step (every D, then G with the DAMSM losses; main.train_step) in fp32 and
with bf16 autocast + channels_last, and the FLOP rate each reaches as a share of a plain
matmul's, measured in the same run (FLOPs counted by torch.utils.flop_counter on one step).

    python bench/dmgan.py                                  # CPU: 2 timed steps per variant
    python bench/dmgan.py --device cuda --steps 20 --warmup 3

Random weights and random text features (the frozen text encoder is not part of the step);
the original implementation's rate, to compare against, is measured outside this project.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main
import models
import utils


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize()


def matmul_rate(dev, dtype, n=2048, reps=10):
    """FLOP/s of an n x n matmul, the machine's practical peak for this dtype."""
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    a @ b
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def build(cfg, dev, channels_last):
    text_dim, B = cfg.TEXT.EMBEDDING_DIM, cfg.TRAIN.BATCH_SIZE
    sizes = [cfg.TREE.BASE_SIZE * 2**i for i in range(cfg.TREE.BRANCH_NUM)]
    torch.manual_seed(0)
    netG = models.build_dmgan_generator(cfg, text_dim)
    netsD = nn.ModuleList([models.DMGANDiscriminator(s, cfg.GAN.DF_DIM, text_dim) for s in sizes])
    netG.apply(main.init_weights)
    netsD.apply(main.init_weights)
    image_enc = models.build_image_encoder(
        {
            'family': 'damsm',
            'dim': text_dim,
            'image_size': 299,
            'backbone': 'inception_v3',
            'width': 0,
            'train_backbone': False,
        }
    )
    image_enc.eval().requires_grad_(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    netG, netsD, image_enc = (m.to(dev, memory_format=fmt) for m in (netG, netsD, image_enc))
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optsD = [
        torch.optim.Adam(
            [p for p in d.parameters() if p.requires_grad], lr=2e-4, betas=(0.5, 0.999)
        )
        for d in netsD
    ]
    reals = [
        torch.rand(B, 3, s, s, device=dev).mul(2).sub(1).contiguous(memory_format=fmt)
        for s in sizes
    ]
    T = 18  # config.py WORDS_NUM
    feats = [
        (
            torch.randn(B, text_dim, T, device=dev),
            torch.randn(B, text_dim, device=dev),
            torch.zeros(B, T, dtype=torch.bool, device=dev),
        )
    ]
    noise = torch.randn(B, cfg.GAN.Z_DIM, device=dev)
    class_ids = torch.arange(B, device=dev)
    return lambda amp, step: main.train_step(
        netG,
        list(netsD),
        optG,
        optsD,
        image_enc,
        reals,
        class_ids,
        feats,
        noise,
        cfg.TRAIN,
        amp,
        step,
    )


def main_():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--cfg', default='cfg/bird_DMGAN.yml')
    p.add_argument('--steps', type=int, default=2, help='timed steps per variant')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--out', default='output/bench/dmgan.json')
    args = p.parse_args()
    dev = utils.get_device(0 if args.device.startswith('cuda') else -1)
    cfg = utils.merge_cfg(
        utils.to_cfg({**utils.COMMON_DEFAULTS, **main.DEFAULTS}),
        utils.load_yaml(args.cfg),
        args.cfg,
    )
    B = cfg.TRAIN.BATCH_SIZE
    rows = {}
    for name, dtype, cl in (
        ('fp32', None, False),
        ('bf16 autocast + channels_last', torch.bfloat16, True),
    ):
        step = build(cfg, dev, cl)
        amp = torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        for i in range(args.warmup):
            step(amp, i)
        with FlopCounterMode(display=False) as fc:
            step(amp, 0)
        flops = fc.get_total_flops()
        sync(dev)
        t = time.perf_counter()
        for i in range(args.steps):
            step(amp, i)
        sync(dev)
        dt = (time.perf_counter() - t) / args.steps
        peak = matmul_rate(dev, dtype or torch.float32)
        rows[name] = {
            'images_per_s': B / dt,
            'seconds_per_step': dt,
            'gflop_per_step': flops / 1e9,
            'tflops': flops / dt / 1e12,
            'matmul_tflops': peak / 1e12,
            'share_of_matmul': flops / dt / peak,
        }
        r = rows[name]
        print(
            f"{name:32s} {r['images_per_s']:.2f} images/s ({dt:.2f} s/step) | {r['gflop_per_step']:.0f} GFLOP/step "
            f"= {r['tflops']:.3f} TFLOP/s, {100 * r['share_of_matmul']:.0f}% of a "
            f"{'bf16' if dtype else 'fp32'} matmul's {r['matmul_tflops']:.3f}",
            flush=True,
        )
    first, second = rows.values()
    print(f"bf16 + channels_last / fp32: {second['images_per_s'] / first['images_per_s']:.2f}x")
    summary = {
        'device': str(dev),
        'cfg': args.cfg,
        'batch': B,
        'steps': args.steps,
        'results': rows,
        'torch': torch.__version__,
        'threads': torch.get_num_threads(),
        'date': time.strftime('%Y-%m-%d %H:%M'),
    }
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(summary, f, indent=1)


if __name__ == '__main__':
    main_()
