"""FID speed: our fid_score.py against pytorch-fid 0.3.0, same images, same weights, one run.

  python bench/fid.py [--n 300] [--dims 2048] [--batch_size 50] [--weights PATH] [--exact] [--repeat 1]

Images: 2 x n test images of data/shapes, resized to 64 px (the embedded generators' size) and
written as PNG. Weights: --weights, else pytorch-fid's file in torch hub's cache, else a
random FID Inception with BatchNorm calibrated on the images (tests/fid_weights.py).
Both run on the CPU with their defaults (pytorch-fid: min(8, CPUs) loader workers).
"""

import argparse
import os
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

import models  # noqa: E402
import utils  # noqa: E402
from fid_weights import calibrated_random_weights  # noqa: E402


def write_images(data_dir, n, out):
    keys = utils.read_attngan_split(data_dir, 'test')[: 2 * n]
    if len(keys) < 2 * n:
        raise SystemExit(f'{data_dir}: {len(keys)} test images, need {2 * n}')
    dirs = [os.path.join(out, 'a'), os.path.join(out, 'b')]
    for d in dirs:
        os.makedirs(d)
    for i, k in enumerate(keys):
        img = utils.load_image(os.path.join(data_dir, 'CUB_200_2011', 'images', k + '.jpg')).resize(
            (64, 64), Image.BICUBIC
        )
        img.save(os.path.join(dirs[i // n], f'{i:05d}.png'))
    return dirs


def pytorch_fid(paths, weights, dims, batch_size):
    import pytorch_fid.fid_score as pf
    import pytorch_fid.inception as pi

    sd = torch.load(weights, weights_only=True)
    with mock.patch.object(pi, 'load_state_dict_from_url', lambda *a, **k: sd):
        return pf.calculate_fid_given_paths(paths, batch_size, 'cpu', dims, utils.num_workers(-1))


def ours(paths, weights, dims, batch_size, exact):
    net = models.feature_net(dims, weights, device='cpu', exact=exact)
    stats = [utils.path_statistics(p, net, batch_size, -1, 'cpu') for p in paths]
    return utils.frechet_distance(*stats[0], *stats[1], method='sqrtm' if exact else 'eig')


def timed(fn, *a):
    t0 = time.perf_counter()
    v = fn(*a)
    return v, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', default=os.path.join(ROOT, 'data/shapes'))
    ap.add_argument('--n', type=int, default=300, help='images per side')
    ap.add_argument('--dims', type=int, default=2048)
    ap.add_argument('--batch_size', type=int, default=50)
    ap.add_argument('--weights')
    ap.add_argument('--exact', action='store_true', help='also time our --exact mode')
    ap.add_argument('--repeat', type=int, default=1)
    args = ap.parse_args()
    print(
        f'torch {torch.__version__}, {torch.get_num_threads()} threads, {utils.num_workers(-1)} loader workers'
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(args.data, args.n, tmp)
        weights = args.weights
        if not weights:
            try:
                weights = utils.weights_path(None, utils.FID_WEIGHTS, utils.FID_WEIGHTS_URL)
                print(f'weights: {weights}')
            except utils.UserError:
                files = utils.list_images(paths[0])[:16] + utils.list_images(paths[1])[:16]
                x = (
                    torch.stack(
                        [torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files]
                    )
                    / 255
                )
                weights = calibrated_random_weights(x.float(), os.path.join(tmp, 'w.pth'))
                print('weights: random FID Inception, BatchNorm calibrated on 32 of the images')
        print(f'{args.n} + {args.n} PNGs of 64 px, dims {args.dims}, batch {args.batch_size}')
        runs = [
            ('pytorch-fid', lambda: pytorch_fid(paths, weights, args.dims, args.batch_size)),
            ('ours', lambda: ours(paths, weights, args.dims, args.batch_size, False)),
        ]
        if args.exact:
            runs.append(
                ('ours --exact', lambda: ours(paths, weights, args.dims, args.batch_size, True))
            )
        times, values = {k: [] for k, _ in runs}, {}
        for r in range(args.repeat):
            for name, fn in runs if r % 2 == 0 else runs[::-1]:
                values[name], t = timed(fn)
                times[name].append(t)
                print(f'  {name:13s} FID {values[name]:.6f}  {t:.1f} s', flush=True)
    ref, t_ref = values['pytorch-fid'], min(times['pytorch-fid'])
    for name in values:
        if name != 'pytorch-fid':
            print(
                f'{name}: FID {values[name]:.6f} vs {ref:.6f} (relative difference '
                f'{abs(values[name] - ref) / abs(ref):.1e}); {t_ref / min(times[name]):.2f}x faster '
                f'({min(times[name]):.1f} s vs {t_ref:.1f} s, best of {args.repeat})'
            )


if __name__ == '__main__':
    main()
