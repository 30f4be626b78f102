"""How sharp an image must be for the shapes judge to read its shapes: the real test images, seen
through a lower resolution or a blur, scored against their own captions.

    python bench/judge_resolution.py [--judge output/judge] [--data data/shapes]

A generator whose 32 px image is drawn at 16 px and upsampled (DM-GAN's last up-block is a
nearest 2x upsampling and one 3x3 conv) cannot score more than these rows.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import models  # noqa: E402
import utils  # noqa: E402

ATTRIBUTES = ('count', 'shape', 'colour', 'size', 'position', 'all')


def views(x):
    """name -> the images (N, 3, 32, 32) in [-1, 1] as that view shows them."""
    down16 = F.interpolate(x, size=16, mode='bilinear', antialias=True)
    down24 = F.interpolate(x, size=24, mode='bilinear', antialias=True)
    return {
        'real, 32 px': x,
        'through 16 px, nearest up': F.interpolate(down16, size=32, mode='nearest'),
        'through 16 px, bilinear up': F.interpolate(down16, size=32, mode='bilinear'),
        'through 24 px, bilinear up': F.interpolate(down24, size=32, mode='bilinear'),
        '3x3 box blur': F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), 3, 1),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--judge', default='output/judge', help='train_judge.py run dir or checkpoint')
    p.add_argument('--data', default='data/shapes')
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    judge = models.load_judge(args.judge)
    data = utils.AttnGANData(args.data, 10)
    ds = utils.TextImageDataset(
        data, 'test', base_size=32, branch_num=1, train=False, flip=False, crop=False
    )
    x = torch.cat([utils.to_uint8(ds.images(k)[-1][None]) for k in ds.keys]).float() / 127.5 - 1
    rows = {}
    print('| view of the 1,000 real test images | ' + ' | '.join(ATTRIBUTES) + ' |')
    print('|---' * (len(ATTRIBUTES) + 1) + '|')
    for name, y in views(x).items():
        acc = utils.judge_accuracy(judge, y.clamp(-1, 1), ds.keys)
        rows[name] = {a: round(float(acc[a]), 3) for a in ATTRIBUTES}
        print(f'| {name} | ' + ' | '.join(f'{rows[name][a]:.3f}' for a in ATTRIBUTES) + ' |')
    print(json.dumps(rows))


if __name__ == '__main__':
    main()
