"""Fréchet Inception Distance equal to pytorch-fid 0.3.0.

  python fid_score.py GEN_DIR REAL_DIR [--dims 2048] [--batch_size 50] [--gpu N] [--weights PATH]
  python fid_score.py --path GEN_DIR REAL_DIR ...          (the same, as one flag)
  python fid_score.py --save-stats REAL_DIR real.npz       statistics for later; either side may be an .npz
  python fid_score.py GEN_DIR REAL_DIR --json fid.json     also write the value and its protocol
  python fid_score.py --data bird|coco                     T2I_CLIP-GAN's preset folders (printed)
  python fid_score.py GEN_DIR output/judge/test_stats.npz --judge output/judge     "shapes FID"

FID (Heusel et al. 2017) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), over the
pool3 (or 64/192/768-d) activations of the TF Inception graph, in float64 (pytorch-fid fid_score.py
calculate_activation_statistics, calculate_frechet_distance). The synthetic dataset, without
Inception weights, takes the features of its judge (train_judge.py) instead: "shapes FID".
The computation is shared with the other scripts (utils.py: statistics, Fréchet distance;
models.py: the networks); here is its command line.
"""

import json
import os

import torch

import models
import utils

DEFAULTS = {
    'FID': {
        'DIMS': 2048,  # pytorch-fid default: pool3 features
        'BATCH_SIZE': 50,  # pytorch-fid default
        'NUM_WORKERS': -1,  # -1: min(8, CPUs), as pytorch-fid
    },
}


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def parse_args():
    p = utils.base_parser(__doc__.splitlines()[0])
    p.add_argument(
        'paths', nargs='*', help='two folders or .npz files (or DIR OUT.npz with --save-stats)'
    )
    p.add_argument('--path', nargs=2, help='the two paths as one flag')
    p.add_argument(
        '--data',
        choices=sorted(utils.EVAL_PRESETS),
        help="T2I_CLIP-GAN's preset: the eval_clip_<data> images against the dataset's",
    )
    p.add_argument('--dims', type=int, help=f'Inception features: {models.FIDInceptionV3.DIMS}')
    p.add_argument('--batch_size', '--batch-size', type=int)
    p.add_argument('--num_workers', '--num-workers', type=int, help='decoding processes')
    p.add_argument('--weights', help=f'FID Inception weights ({utils.FID_WEIGHTS})')
    p.add_argument(
        '--save-stats',
        '--save_stats',
        dest='save_stats',
        action='store_true',
        help='write the statistics of the first path to the second (.npz)',
    )
    p.add_argument('--json', help='also write the result and its protocol to this file')
    p.add_argument(
        '--exact',
        action='store_true',
        help="pytorch-fid's arithmetic bit for bit (slower): "
        "no BatchNorm folding, NCHW, scipy's sqrtm",
    )
    p.add_argument(
        '--judge', help='shapes judge (run dir or checkpoint): its features instead of Inception'
    )
    return p.parse_args()


def protocol(paths, net):
    """utils.protocol of an FID: the first path's images (none for an .npz), no split and no seed
    (FID draws nothing), the feature network's resizing and weights file."""
    weights = {'fid_features': net.weights_path}
    if paths[0].endswith('.npz'):
        return utils.protocol(None, None, None, None, net.resize, weights)
    return utils.folder_protocol(utils.folder_images(paths[0]), None, net.resize, weights)


def main():
    args = parse_args()
    cfg = utils.build_cfg(DEFAULTS, args).FID
    gpu = args.gpu if args.gpu is not None else (0 if torch.cuda.is_available() else -1)
    device = utils.get_device(gpu)
    batch_size = args.batch_size or cfg.BATCH_SIZE
    workers = cfg.NUM_WORKERS if args.num_workers is None else args.num_workers
    paths = args.path or args.paths
    if args.data:
        if paths:
            raise utils.UserError(f"--data {args.data} names both folders; give no paths with it")
        paths = utils.eval_preset(args.data)
    if len(paths) != 2:
        raise utils.UserError(
            f"expected two paths (GEN_DIR REAL_DIR, or --save-stats DIR OUT.npz), got {len(paths)}"
        )
    if args.judge and args.dims:
        raise utils.UserError("--dims is for the Inception; the judge has its own feature size")
    net = models.feature_net(args.dims or cfg.DIMS, args.weights, args.judge, device, args.exact)
    if args.save_stats:
        if os.path.exists(paths[1]):
            raise utils.UserError(f"{paths[1]}: exists; not overwriting statistics")
        mu, sigma = utils.path_statistics(paths[0], net, batch_size, workers, device)
        utils.save_statistics(paths[1], mu, sigma, net.name)
        print(f"saved {net.name} statistics of {paths[0]} to {paths[1]}")
        return
    for p in paths:
        if not os.path.exists(p):
            raise utils.UserError(f"{p}: not found")
    stats = [utils.path_statistics(p, net, batch_size, workers, device) for p in paths]
    fid = utils.frechet_distance(*stats[0], *stats[1], method='sqrtm' if args.exact else 'eig')
    print('FID: ', fid)
    if args.json:
        result = {
            'fid': fid,
            'paths': paths,
            'features': net.name,
            'protocol': protocol(paths, net),
        }
        utils.atomic_write_text(args.json, json.dumps(result, indent=2))


if __name__ == '__main__':
    utils.run_main(main)
