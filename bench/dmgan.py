"""DM-GAN training-step speed at the original bird cfg (cfg/bird_DMGAN.yml: batch 10, three
stages to 256 px, DF 32 / GF 64, R_NUM 2; DAMSM Inception-v3 image encoder at 299 px, frozen):
images/s of a full step (every D, then G with the DAMSM losses, main.train_step; then the EMA
update) in fp32 and with bf16 autocast + channels_last, and the FLOP rate each reaches as a
share of a plain matmul's, measured in the same run (FLOPs counted by torch.utils.flop_counter on one step).

    python bench/dmgan.py                                  # CPU: 2 timed steps per variant
    python bench/dmgan.py --device cuda --steps 20 --warmup 3
    python bench/dmgan.py --cfg cfg/shapes_DMGAN.yml --no-damsm --steps 20   # another cfg's G and Ds

Random weights and random text features (the frozen text encoder is not part of the step).

    python bench/dmgan.py --original DM-GAN/code           # against the original's modules
    python bench/dmgan.py --original DM-GAN/code --profile # + top operators, peak memory per side

times, alternating in one process on the same inputs, the original's step (MinfengZhu/DM-GAN
code/model.py G_NET and D_NET64/128/256 at its cfg/bird_DMGAN.yml, the D and G updates of
code/trainer.py train() with miscc/losses.py's adversarial terms, KL_loss and the 0.999
parameter average) and ours doing the same work (main.train_step without the DAMSM image
encoder, models.ema_update, the memory format main.py picks), in fp32; it prints each rate and
ours / original.
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import main
import models
import parity_originals  # the original code imported as it is, with the shims it needs
import profiling
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


def adversarial_inputs(cfg, dev):
    """Real images per stage, words / sentence / padding mask of 18 words, z: one seeded draw."""
    text_dim, B, T = cfg.TEXT.EMBEDDING_DIM, cfg.TRAIN.BATCH_SIZE, 18  # config.py WORDS_NUM
    sizes = [cfg.TREE.BASE_SIZE * 2**i for i in range(cfg.TREE.BRANCH_NUM)]
    g = torch.Generator().manual_seed(0)
    return {
        'reals': [(torch.rand(B, 3, s, s, generator=g) * 2 - 1).to(dev) for s in sizes],
        'words': torch.randn(B, text_dim, T, generator=g).to(dev),
        'sent': torch.randn(B, text_dim, generator=g).to(dev),
        'mask': torch.zeros(B, T, dtype=torch.bool, device=dev),
        'cap_lens': torch.full((B,), T, dtype=torch.long, device=dev),
        'noise': torch.randn(B, cfg.GAN.Z_DIM, generator=g).to(dev),
    }


def build(cfg, dev, layout, x, damsm=True):
    """main.py's step on inputs x: every D, then G (with the DAMSM losses through a frozen
    Inception-v3 unless damsm is False), then the EMA update; step(amp, i)."""
    text_dim = cfg.TEXT.EMBEDDING_DIM
    torch.manual_seed(0)
    netG = models.build_dmgan_generator(cfg, text_dim)
    netsD = models.build_dmgan_discriminators(cfg, text_dim)
    for net in (netG, *netsD):
        net.apply(models.init_weights)
        net.to(dev, memory_format=layout)
    image_enc, train_cfg = None, utils.to_cfg({**cfg.TRAIN, 'SMOOTH': {**cfg.TRAIN.SMOOTH}})
    if damsm:
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
        image_enc.eval().requires_grad_(False).to(dev, memory_format=layout)
    else:
        train_cfg.SMOOTH.LAMBDA = 0.0  # main.train_step then runs no image encoder
    netG_ema = copy.deepcopy(netG).eval().requires_grad_(False)
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optsD = [
        torch.optim.Adam([p for p in d.parameters() if p.requires_grad], 2e-4, betas=(0.5, 0.999))
        for d in netsD
    ]
    reals = [r.contiguous(memory_format=layout) for r in x['reals']]
    feats = [(x['words'], x['sent'], x['mask'])]
    class_ids = torch.arange(x['sent'].shape[0], device=dev)

    def step(amp, i):
        args = (optG, optsD, image_enc, reals, class_ids, feats, x['noise'], train_cfg, amp, i)
        main.train_step(netG, netsD, *args)
        models.ema_update(netG_ema, netG, train_cfg.EMA_DECAY)

    return step


def original_adversarial(code_dir, x, dev):
    """The original's modules and its trainer.py step without the DAMSM words/sentence terms."""
    mod = parity_originals.import_original(code_dir)
    parity_originals.configure(mod, os.path.join(code_dir, 'cfg', 'bird_DMGAN.yml'), False)
    torch.manual_seed(0)
    netG = mod.G_NET().to(dev)
    netsD = [d().to(dev) for d in (mod.D_NET64, mod.D_NET128, mod.D_NET256)]
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optsD = [
        torch.optim.Adam([p for p in d.parameters() if p.requires_grad], 2e-4, betas=(0.5, 0.999))
        for d in netsD
    ]
    avg_param_G = [p.detach().clone() for p in netG.parameters()]
    B = x['sent'].shape[0]
    real_labels, fake_labels = torch.ones(B, device=dev), torch.zeros(B, device=dev)
    bce = nn.BCELoss()
    sent, words, reals = x['sent'], x['words'], x['reals']

    def step(i):
        fake_imgs, _, mu, logvar = netG(x['noise'], sent, words, x['mask'], x['cap_lens'])
        for netD, opt, real, fake in zip(netsD, optsD, reals, fake_imgs):  # losses.py
            netD.zero_grad()
            real_features, fake_features = netD(real), netD(fake.detach())
            cond_real = bce(netD.COND_DNET(real_features, sent), real_labels)
            cond_fake = bce(netD.COND_DNET(fake_features, sent), fake_labels)
            cond_wrong = bce(netD.COND_DNET(real_features[: B - 1], sent[1:B]), fake_labels[1:B])
            real_err = bce(netD.UNCOND_DNET(real_features), real_labels)
            fake_err = bce(netD.UNCOND_DNET(fake_features), fake_labels)
            errD = (real_err + cond_real) / 2.0 + (fake_err + cond_fake + cond_wrong) / 3.0
            errD.backward()
            opt.step()
        netG.zero_grad()
        errG = 0
        for netD, fake in zip(netsD, fake_imgs):
            features = netD(fake)
            errG = errG + bce(netD.COND_DNET(features, sent), real_labels)
            errG = errG + bce(netD.UNCOND_DNET(features), real_labels)
        kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())  # losses.py KL_loss
        (errG + kl).backward()
        optG.step()
        with torch.no_grad():
            for p, avg_p in zip(netG.parameters(), avg_param_G):
                avg_p.mul_(0.999).add_(p, alpha=0.001)

    return step


def load_cfg(path):
    return utils.merge_cfg(
        utils.to_cfg({**utils.COMMON_DEFAULTS, **main.DEFAULTS}), utils.load_yaml(path), path
    )


def side_original(cfg_path, code_dir, device):
    """The original's step at cfg_path's inputs, step(i); module level for profiling's children."""
    dev = torch.device(device)
    return original_adversarial(code_dir, adversarial_inputs(load_cfg(cfg_path), dev), dev)


def side_ours(cfg_path, device):
    """Ours doing the original's work (no DAMSM image encoder, the memory format main.py picks)."""
    dev, cfg = torch.device(device), load_cfg(cfg_path)
    ours = build(cfg, dev, utils.memory_format(cfg.TRAIN, dev), adversarial_inputs(cfg, dev), False)
    amp, _ = utils.autocast(dev, False)
    return lambda i: ours(amp, i)


def against_original(cfg_path, B, code_dir, dev, steps, warmup, rounds=3, profile=False):
    """Alternating rounds of `steps` timed steps each; the median of each side's rounds; with
    profile, each side's top operators of one step and its peak memory in a process of its own.
    B is the cfg's batch size, for images/s."""
    sides = {
        'original modules (fp32)': (side_original, (cfg_path, code_dir, str(dev))),
        'ours, same work (fp32, TRAIN.MEMORY_FORMAT auto)': (side_ours, (cfg_path, str(dev))),
    }
    steps_of = {name: make(*args) for name, (make, args) in sides.items()}
    for step in steps_of.values():
        for i in range(warmup):
            step(i)
    times = {name: [] for name in sides}
    for _ in range(rounds):
        for name, step in steps_of.items():
            sync(dev)
            t = time.perf_counter()
            for i in range(steps):
                step(i)
            sync(dev)
            times[name].append((time.perf_counter() - t) / steps)
    rows = {}
    for name, ts in times.items():
        dt = sorted(ts)[len(ts) // 2]
        rows[name] = {'images_per_s': B / dt, 'seconds_per_step': dt, 'rounds_s': ts}
        print(f"{name:40s} {B / dt:.3f} images/s ({dt:.2f} s/step; rounds {ts})", flush=True)
    if profile:
        for name, (make, args) in sides.items():
            rows[name]['top_ops'] = profiling.top_ops(lambda: steps_of[name](0), dev)
            profiling.print_top_ops(name, rows[name]['top_ops'])
            mib = profiling.peak_memory_mib(make, args, warmup + steps, str(dev))
            rows[name]['peak_memory_mib'] = mib
            kind = 'allocator peak' if dev.type == 'cuda' else 'max RSS of its own process'
            print(f'{name}: peak memory {mib:.0f} MiB ({kind}, {warmup + steps} steps)', flush=True)
    original, ours = rows.values()
    ratio = ours['images_per_s'] / original['images_per_s']
    print(f"ours / original: {ratio:.2f}x (fp32, same work, batch {B})")
    return rows, ratio


def main_():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--cfg', default='cfg/bird_DMGAN.yml')
    p.add_argument('--steps', type=int, default=2, help='timed steps per variant')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--out', default='output/bench/dmgan.json')
    p.add_argument('--original', help="MinfengZhu/DM-GAN code/ folder: time against its modules")
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds (with --original)')
    p.add_argument(
        '--no-damsm',
        action='store_true',
        help="leave out the DAMSM term (it always runs through the bird cfg's Inception-v3)",
    )
    p.add_argument(
        '--profile',
        action='store_true',
        help='with --original: top 10 operators of one step and peak memory of each side',
    )
    args = p.parse_args()
    dev = utils.get_device(0 if args.device.startswith('cuda') else -1)
    cfg = load_cfg(args.cfg)
    B = cfg.TRAIN.BATCH_SIZE
    if args.original:
        rows, ratio = against_original(
            args.cfg, B, args.original, dev, args.steps, args.warmup, args.rounds, args.profile
        )
        os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(
                {
                    'device': str(dev),
                    'cfg': args.cfg,
                    'original': parity_originals.git_head(args.original),
                    'batch': B,
                    'results': rows,
                    'ours_over_original': ratio,
                    'threads': torch.get_num_threads(),
                    'date': time.strftime('%Y-%m-%d %H:%M'),
                },
                f,
                indent=1,
            )
        return
    rows = {}
    x = adversarial_inputs(cfg, dev)
    for name, dtype, layout in (
        ('fp32', None, torch.contiguous_format),
        ('bf16 autocast + channels_last', torch.bfloat16, torch.channels_last),
    ):
        step = build(cfg, dev, layout, x, damsm=not args.no_damsm)
        amp, _ = utils.autocast(dev, dtype is not None)  # as main.py's TRAIN.AMP
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
