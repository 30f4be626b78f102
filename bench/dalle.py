"""Speed of the DALLE pipeline against dalle-pytorch 1.6.6, in one process: training steps/s
of the DiscreteVAE (train_vae.train_step) and of DALLE (train_dalle.train_step, the frozen
VAE's tokenisation included, as dalle-pytorch does it inside its forward), and image tokens/s
of dalle_gen.generate against DALLE.generate_images. Same hyperparameters, equal parameter
counts (asserted), dalle-pytorch's weights copied into ours so both compute the same loss
(asserted); rounds alternate between the two so that a busy machine slows both alike.

    pip install -r bench/requirements.txt      # dalle-pytorch and its dependencies: see that file
    python bench/dalle.py                      # preset text2img (its sizes), CPU, batch 4
    python bench/dalle.py --preset small --threads 1
    python bench/dalle.py --device cuda --batch 16
    python bench/dalle.py --preset small --amp     # ours as `--amp` runs it (bf16 autocast); dalle-pytorch's
                                                   # --amp does nothing without DeepSpeed, so it stays fp32

Ours differs in how, not what, it computes: Adam is the fused kernel; attention goes through
scaled_dot_product_attention; each half of the output head is computed only for the
positions allowed to use it (equal to dalle-pytorch's masked softmax); sampling keeps a
key/value cache (dalle-pytorch's generate_images defaults to use_cache=False, as text2img's
dalle_gen.py ran it; the 'dalle-pytorch, use_cache=True' row is its cached mode).
"""

import argparse
import json
import os
import statistics
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dalle_gen  # noqa: E402
import models  # noqa: E402
import train_dalle  # noqa: E402
import train_vae  # noqa: E402
import utils  # noqa: E402

PRESETS = {  # text2img: its train_vae command and the DALLE of its dalle_gen.py checkpoint (depth 8)
    'text2img': dict(
        vae=dict(
            image_size=256,
            num_layers=4,
            num_tokens=1024,
            codebook_dim=256,
            hidden_dim=256,
            num_resnet_blocks=2,
        ),
        dalle=dict(dim=512, depth=8, heads=8, dim_head=64, text_seq_len=32, num_text_tokens=21128),
    ),
    'small': dict(
        vae=dict(
            image_size=64,
            num_layers=3,
            num_tokens=512,
            codebook_dim=64,
            hidden_dim=64,
            num_resnet_blocks=1,
        ),
        dalle=dict(dim=256, depth=4, heads=4, dim_head=64, text_seq_len=32, num_text_tokens=200),
    ),
}


def import_dalle_pytorch():
    """dalle_pytorch imports taming, whose main.py wants pytorch_lightning.utilities.distributed
    (moved to .rank_zero in current Lightning): a stand-in module for the old path."""
    try:
        import pytorch_lightning.utilities.rank_zero as rz

        m = types.ModuleType('pytorch_lightning.utilities.distributed')
        m.rank_zero_only = rz.rank_zero_only
        sys.modules.setdefault('pytorch_lightning.utilities.distributed', m)
    except ImportError:
        pass
    import dalle_pytorch

    return dalle_pytorch


def count(module, skip=()):
    return sum(p.numel() for k, p in module.named_parameters() if not k.startswith(skip))


def dp_to_ours(sd):
    """dalle-pytorch DALLE state dict (VAE excluded) -> models.DALLE names."""
    out = {}
    for k, v in sd.items():
        if k.startswith('vae.'):
            continue
        if k.startswith('image_pos_emb.weights'):
            out['image_pos_row' if k.endswith('0') else 'image_pos_col'] = v.reshape(
                v.shape[1] * v.shape[2], -1
            )
            continue
        if k.startswith('to_logits.'):
            out[('norm_out.' if k[10] == '0' else 'to_logits.') + k.split('.')[-1]] = v
            continue
        if k.startswith('transformer.layers.layers.'):
            i, j, rest = k.split('.')[3], k.split('.')[4], '.'.join(k.split('.')[5:])
            part = 'attn' if j == '0' else 'ff'
            name = {
                'scale': f'scale_{part}',
                'fn.norm.weight': f'norm_{part}.weight',
                'fn.norm.bias': f'norm_{part}.bias',
                'fn.fn.fn.to_qkv.weight': 'attn.to_qkv.weight',
                'fn.fn.fn.to_out.0.weight': 'attn.to_out.weight',
                'fn.fn.fn.to_out.0.bias': 'attn.to_out.bias',
                'fn.fn.net.0.weight': 'ff.fc_in.weight',
                'fn.fn.net.0.bias': 'ff.fc_in.bias',
                'fn.fn.net.3.weight': 'ff.fc_out.weight',
                'fn.fn.net.3.bias': 'ff.fc_out.bias',
            }[rest]
            out[f'blocks.{i}.{name}'] = v.reshape(-1) if rest == 'scale' else v
            continue
        out[k] = v
    return out


def timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - t


def alternate(fns, rounds, device):
    """Median seconds of each fn over `rounds` rounds, the fns taking turns (after one warm-up each)."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(timed(f, device))
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--preset', choices=sorted(PRESETS), default='text2img')
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--steps', type=int, default=3, help='timed rounds per comparison (median)')
    p.add_argument('--sample_batch', type=int, default=1)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--only', choices=['vae', 'dalle', 'sample'], action='append')
    p.add_argument(
        '--amp',
        action='store_true',
        help="ours with bf16 autocast, as train_vae/train_dalle's AMP "
        "(dalle-pytorch's --amp is a no-op without DeepSpeed: it runs fp32 either way)",
    )
    p.add_argument('--json', default='', help='also write the results here')
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dp = import_dalle_pytorch()
    preset = PRESETS[a.preset]
    only = set(a.only or ['vae', 'dalle', 'sample'])
    res = {
        'preset': a.preset,
        'batch': a.batch,
        'device': str(dev),
        'threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'dalle_pytorch': '1.6.6',
        'date': time.strftime('%Y-%m-%d %H:%M'),
        'ours_amp': a.amp,
    }
    torch.manual_seed(0)
    their_vae = dp.DiscreteVAE(**preset['vae']).to(dev)
    our_vae = models.DiscreteVAE(**preset['vae']).to(dev)
    our_vae.load_state_dict(their_vae.state_dict())
    assert count(our_vae) == count(their_vae)
    res['vae_params'] = count(our_vae)
    image_size = preset['vae']['image_size']
    images01 = torch.rand(a.batch, 3, image_size, image_size, device=dev)

    if 'vae' in only:
        vae_train_cfg = utils.to_cfg(train_vae.DEFAULTS['TRAIN'])
        amp, _ = utils.autocast(dev, a.amp)
        opt_o = utils.make_optimizer(our_vae.parameters(), vae_train_cfg.LEARNING_RATE)
        opt_t = torch.optim.Adam(their_vae.parameters(), lr=vae_train_cfg.LEARNING_RATE)

        def ours():
            train_vae.train_step(our_vae, opt_o, images01 * 2 - 1, 0.9, vae_train_cfg, amp)

        def theirs():
            loss = their_vae(images01, return_loss=True, temp=0.9)
            opt_t.zero_grad()
            loss.backward()
            opt_t.step()

        t = alternate({'ours': ours, 'theirs': theirs}, a.steps, dev)
        res['vae_train_steps_per_s'] = {k: 1 / v for k, v in t.items()}
        res['vae_speedup'] = t['theirs'] / t['ours']
        print(
            f"DiscreteVAE train step ({res['vae_params']:,} params, batch {a.batch}, {image_size}px): ours "
            f"{1 / t['ours']:.3f}/s, dalle-pytorch {1 / t['theirs']:.3f}/s -> x{res['vae_speedup']:.2f}",
            flush=True,
        )

    if only & {'dalle', 'sample'}:
        dalle_preset = preset['dalle']
        torch.manual_seed(1)
        their_vae.eval()
        theirs_m = dp.DALLE(
            vae=their_vae,
            num_text_tokens=dalle_preset['num_text_tokens'],
            text_seq_len=dalle_preset['text_seq_len'],
            dim=dalle_preset['dim'],
            depth=dalle_preset['depth'],
            heads=dalle_preset['heads'],
            dim_head=dalle_preset['dim_head'],
            shift_tokens=False,
            rotary_emb=False,
        ).to(dev)  # train_dalle.py's defaults
        fmap = their_vae.image_size // 2**their_vae.num_layers
        ours_m = models.DALLE(
            dalle_preset['num_text_tokens'],
            dalle_preset['text_seq_len'],
            their_vae.num_tokens,
            fmap,
            dalle_preset['dim'],
            dalle_preset['depth'],
            dalle_preset['heads'],
            dalle_preset['dim_head'],
        ).to(dev)
        ours_m.load_state_dict(dp_to_ours(theirs_m.state_dict()))
        assert count(ours_m) == count(theirs_m, skip=('vae.',))
        res['dalle_params'] = count(ours_m)
        text = torch.randint(
            1, dalle_preset['num_text_tokens'], (a.batch, dalle_preset['text_seq_len']), device=dev
        )
        text[:, dalle_preset['text_seq_len'] // 2 :] = 0
        with torch.no_grad():
            tokens = our_vae.eval().get_codebook_indices(images01 * 2 - 1)
            lo, lt = ours_m(text, tokens)[0].item(), theirs_m(text, tokens, return_loss=True).item()
        assert abs(lo - lt) < 1e-3 * max(1.0, abs(lt)), (lo, lt)
        res['same_loss'] = {'ours': lo, 'theirs': lt}

    if 'dalle' in only:
        dalle_train_cfg = utils.to_cfg({**train_dalle.DEFAULTS['TRAIN'], 'AMP': a.amp})
        amp, _ = utils.autocast(dev, a.amp)  # train_dalle's default AMP_DTYPE, bfloat16
        opt_o = utils.make_optimizer(ours_m.parameters(), dalle_train_cfg.LEARNING_RATE)
        opt_t = torch.optim.Adam(
            [q for q in theirs_m.parameters() if q.requires_grad], lr=dalle_train_cfg.LEARNING_RATE
        )

        def ours():
            train_dalle.train_step(
                ours_m, our_vae, opt_o, images01 * 2 - 1, text, dalle_train_cfg, amp
            )

        def theirs():  # dalle-pytorch's train_dalle.py step (DummyBackend): forward with raw images
            loss = theirs_m(text, images01, return_loss=True)
            opt_t.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs_m.parameters(), dalle_train_cfg.CLIP_GRAD_NORM)
            opt_t.step()

        t = alternate({'ours': ours, 'theirs': theirs}, a.steps, dev)
        res['dalle_train_steps_per_s'] = {k: 1 / v for k, v in t.items()}
        res['dalle_speedup'] = t['theirs'] / t['ours']
        print(
            f"DALLE train step ({res['dalle_params']:,} params, batch {a.batch}): ours {1 / t['ours']:.3f}/s, "
            f"dalle-pytorch {1 / t['theirs']:.3f}/s -> x{res['dalle_speedup']:.2f}",
            flush=True,
        )

    if 'sample' in only:
        ours_m.eval()
        theirs_m.eval()
        n, seq = a.sample_batch, ours_m.image_seq_len
        one = text[:1]

        def ours():
            dalle_gen.generate(ours_m, our_vae, one, n, n, 0.9, 1.0, 0)

        def theirs():
            theirs_m.generate_images(one.expand(n, -1), filter_thres=0.9)

        def theirs_cached():
            theirs_m.generate_images(one.expand(n, -1), filter_thres=0.9, use_cache=True)

        t = alternate(
            {'ours': ours, 'theirs': theirs, 'theirs_cached': theirs_cached},
            max(1, a.steps - 2),
            dev,
        )
        res['sample_tokens_per_s'] = {k: n * seq / v for k, v in t.items()}
        res['sample_speedup'] = t['theirs'] / t['ours']
        res['sample_speedup_vs_cached'] = t['theirs_cached'] / t['ours']
        print(
            f"sampling {n}x{seq} image tokens: ours {n * seq / t['ours']:.1f} tok/s, dalle-pytorch "
            f"{n * seq / t['theirs']:.1f} tok/s (use_cache=True: {n * seq / t['theirs_cached']:.1f}) -> "
            f"x{res['sample_speedup']:.2f} (x{res['sample_speedup_vs_cached']:.2f} vs its cache)",
            flush=True,
        )
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
