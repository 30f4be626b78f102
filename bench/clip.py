"""Training steps/s of our RN50 CLIP (models.py, family clip) against open_clip's, in one run:
same model config (open_clip model_configs/RN50.json), random init, the same batch of images
and BPE-tokenised captions, CLIP's loss, AdamW without decay on gains/biases, the logit-scale
clamp. Rounds alternate between the two so that a busy machine slows both alike.

    python bench/clip.py --threads 1           # CPU, batch 4 (CPU time per step: steady on a shared machine)
    python bench/clip.py --device cuda --batch 64 --steps 20
    python bench/clip.py --threads 1 --profile # + each side's top operators and peak memory

Ours differs in how, not what, it computes: the text transformer runs only up to the longest
caption of the batch (exact under the causal mask), the attention pool computes only the query
it keeps, and attention goes through scaled_dot_product_attention. The row 'ours, text padded
to 77' switches off the first of these, for a like-for-like count of text FLOPs.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models
import profiling
import utils

CAPTIONS = [
    'a red circle on the left',
    'there is a large blue square in the top right corner',
    'the small green star is below the yellow triangle',
    'a tiny pink cross near the bottom',
    'an orange diamond to the left of a purple circle',
    'a big cyan rhombus in the middle',
    'the little red plus sign is at the lower left',
    'a large yellow five-pointed star at the top',
]


def adamw(model):
    """open_clip's param groups: no weight decay on gains, biases and logit_scale."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{'params': decay, 'weight_decay': 0.1}, {'params': rest, 'weight_decay': 0.0}],
        lr=1e-4,
        betas=(0.9, 0.999),
        eps=1e-8,
    )


class Ours(torch.nn.Module):
    def __init__(self):
        super().__init__()
        vocab = {
            'kind': 'words',
            'context_length': 77,
            'vocab': [f'w{i}' for i in range(49406)] + ['<sot>', '<eot>'],
        }
        self.text = models.build_text_encoder(
            {
                'family': 'clip',
                'dim': 1024,
                'tokenizer': vocab,
                'width': 512,
                'heads': 8,
                'layers': 12,
                'keep_special': False,
            }
        )
        self.image = models.build_image_encoder(
            {
                'family': 'clip',
                'dim': 1024,
                'image_size': 224,
                'layers': [3, 4, 6, 3],
                'width': 64,
                'head_width': 64,
                'patch_size': 0,
            }
        )
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def make_step(name, batch, device, pad_text=False):
    """One side's training step on the shared batch (seeded, so both sides see the same
    images and captions): -> (step, parameter count, longest caption in tokens)."""
    import open_clip

    torch.manual_seed(0)
    ids = open_clip.get_tokenizer('RN50')([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
    ids = ids.to(device)
    lengths = ids.argmax(-1) + 1  # up to and with the end token (the largest id)
    images = torch.rand(batch, 3, 224, 224, device=device) * 2 - 1
    if name == 'open_clip':
        model = open_clip.create_model('RN50').to(device)
        normed = models._prepare(images, 224, models.CLIP_MEAN, models.CLIP_STD)  # its input
        clip_loss = open_clip.ClipLoss()

        def loss_of():
            return clip_loss(*model(normed, ids))
    else:
        model = Ours().to(device)
        text_lengths = torch.full_like(lengths, 77) if pad_text else lengths

        def loss_of():
            _, glob = model.image(images, regions=False)
            _, sent, _ = model.text(ids, text_lengths)
            return models.clip_loss(glob, sent, model.logit_scale)

    opt = adamw(model)

    def step():
        loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    return step, sum(p.numel() for p in model.parameters()), int(lengths.max())


def side_step(name, batch, device, pad_text, threads):
    """step(i) of one side, built in profiling's child process (module level for spawn)."""
    if threads:
        torch.set_num_threads(threads)
    step = make_step(name, batch, torch.device(device), pad_text)[0]
    return lambda i: step()


def timed(fn, steps, device):
    """-> (steps per wall second, CPU seconds per step). On a shared machine the CPU time
    (with --threads 1) is the steadier measure of the work a step takes."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = fn()
    float(loss.detach())
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - wall_start), (time.process_time() - cpu_start) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--steps', type=int, default=2, help='timed steps per round')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0 = torch default)')
    p.add_argument('--out', default='output/bench/clip.json')
    p.add_argument(
        '--profile',
        action='store_true',
        help="also each side's top 10 operators of one step and its peak memory, in a process of its own",
    )
    args = p.parse_args()
    device = utils.get_device(0 if args.device.startswith('cuda') else -1)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = {}
    for label, pad in (('ours', False), ('ours, text padded to 77', True)):
        steps, counts = {}, {}
        for name in ('open_clip', 'ours'):
            steps[name], counts[name], longest = make_step(name, args.batch, device, pad)
            steps[name]()  # warm-up
        runs = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, fn in steps.items():
                runs[name].append(timed(fn, args.steps, device))
        med = {
            k: (sorted(r for r, _ in v)[len(v) // 2], sorted(c for _, c in v)[len(v) // 2])
            for k, v in runs.items()
        }
        rows[label] = {
            'ours_steps_per_s': med['ours'][0],
            'open_clip_steps_per_s': med['open_clip'][0],
            'ratio': med['ours'][0] / med['open_clip'][0],
            'ours_cpu_s_per_step': med['ours'][1],
            'open_clip_cpu_s_per_step': med['open_clip'][1],
            'cpu_ratio': med['open_clip'][1] / med['ours'][1],
        }
        if args.profile:
            for name, fn in steps.items():
                ops = profiling.top_ops(fn, device)
                profiling.print_top_ops(f'{name}, row "{label}"', ops)
                mib = profiling.peak_memory_mib(
                    side_step, (name, args.batch, str(device), pad, args.threads), 2, str(device)
                )
                print(f'peak memory, {name}: {mib:,.0f} MiB', flush=True)
                rows[label][f'{name}_top_ops'] = ops
                rows[label][f'{name}_peak_mib'] = mib
        print(
            f"{label:24s} {med['ours'][0]:.3f} vs open_clip {med['open_clip'][0]:.3f} steps/s (ratio "
            f"{rows[label]['ratio']:.2f}) | CPU s/step {med['ours'][1]:.2f} vs {med['open_clip'][1]:.2f} "
            f"(ratio {rows[label]['cpu_ratio']:.2f})",
            flush=True,
        )
    summary = {
        'device': str(device),
        'batch': args.batch,
        'steps_per_round': args.steps,
        'rounds': args.rounds,
        'longest_caption_tokens': longest,
        'parameters': counts,
        'results': rows,
        'torch': torch.__version__,
        'threads': torch.get_num_threads(),
        'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None,
        'date': time.strftime('%Y-%m-%d %H:%M'),
    }
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == '__main__':
    main()
