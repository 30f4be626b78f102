"""Inception Score (Salimans et al. 2016) as the original improved-GAN code computes it.

  python inception_score.py --path GEN_DIR [--splits 10] [--batch_size 50] [--gpu N] [--weights PATH]
                            [--net tf|torchvision] [--json is.json]

IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the split; reported as
mean and std over `splits` consecutive splits (metrics.md). The classifier:
  --net tf           (default) the 1008-way logits, without the fc bias, of the TF
                     Inception graph the papers' numbers come from, i.e. the FID network
                     with pytorch-fid's weights (torch-fidelity takes the same logits)
  --net torchvision  torchvision's ImageNet Inception-v3 (1000 classes), as sbarratt's
                     inception-score-pytorch and T2I_CLIP-GAN compute it; other weights,
                     other numbers: not comparable with the papers' tables
Images are read and resized as for FID: RGB in [0, 1], bilinear to 299, scaled to [-1, 1].
"""
import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

import fid_score
import utils

DEFAULTS = {
    'SPLITS': 10,          # improved-GAN's inception_score(splits=10)
    'BATCH_SIZE': 50,
    'NET': 'tf',
    'NUM_WORKERS': -1,     # -1: min(8, CPUs)
}

TV_WEIGHTS = 'inception_v3_google-0cc3c7bd.pth'
TV_WEIGHTS_URL = 'https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth'


def inception_score(logits, splits=10, shuffle_seed=None):
    """(mean, std) of exp(mean KL(p(y|x) || p(y))) over `splits` consecutive splits
    (boundaries i*N//splits, as the original), in float64 from log-softmax.
    shuffle_seed: permute the samples first with RandomState(seed), as torch-fidelity
    does by default (seed 2020); None keeps the original's order."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    n = logits.shape[0]
    if n < splits:
        raise utils.UserError(f"{n} images for {splits} splits; the papers use 30,000-50,000")
    if shuffle_seed is not None:
        logits = logits[np.random.RandomState(shuffle_seed).permutation(n)]
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_py = torch.logsumexp(part, dim=0) - np.log(len(part))          # log p(y), the split's marginal
        kl = (part.exp() * (part - log_py)).sum(dim=1)                      # KL(p(y|x) || p(y)) per image
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def classifier(net, weights, device):
    """images in [0, 1] -> logits, for --net tf or torchvision."""
    if net == 'tf':
        inc = fid_score.fid_inception(weights, device)
        return lambda x: inc.logits(inc(x.contiguous(memory_format=torch.channels_last), 2048))
    if net == 'torchvision':
        import torchvision
        tv = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=False,
                                             init_weights=False)
        path = fid_score.weights_path(weights, TV_WEIGHTS, TV_WEIGHTS_URL)
        tv = fid_score.load_state_dict(tv, path).eval().requires_grad_(False).to(device)
        # sbarratt: inputs in [-1, 1], bilinear upsampling to 299, transform_input=False
        return lambda x: tv(2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1)
    raise utils.UserError(f"--net {net}: expected tf or torchvision")


@torch.inference_mode()
def folder_logits(path, net, batch_size=50, workers=-1, device='cpu'):
    files = fid_score.folder_images(path)
    out = [net(x).double().cpu() for x in utils.progress(
        fid_score.batches(files, batch_size, workers, device), total=-(-len(files) // batch_size),
        desc='IS', every=20)]
    return torch.cat(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('paths', nargs='*', help='folder of generated images')
    p.add_argument('--path', help='folder of generated images (the seeds\' spelling)')
    p.add_argument('--splits', type=int, default=DEFAULTS['SPLITS'])
    p.add_argument('--batch_size', '--batch-size', type=int, default=DEFAULTS['BATCH_SIZE'])
    p.add_argument('--num_workers', '--num-workers', type=int, default=DEFAULTS['NUM_WORKERS'])
    p.add_argument('--net', choices=['tf', 'torchvision'], default=DEFAULTS['NET'])
    p.add_argument('--weights', help=f'{fid_score.FID_WEIGHTS} (tf) or {TV_WEIGHTS} (torchvision)')
    p.add_argument('--gpu', type=int, help='CUDA device; default: cuda:0 when there is one, else CPU')
    p.add_argument('--shuffle_seed', type=int, help='shuffle before splitting (torch-fidelity: 2020)')
    p.add_argument('--json', help='also write the result to this file')
    args = p.parse_args()
    paths = ([args.path] if args.path else []) + args.paths
    if args.splits < 1 or args.batch_size < 1:
        raise utils.UserError(f"--splits {args.splits} --batch_size {args.batch_size}: expected at least 1 each")
    if len(paths) != 1:
        raise utils.UserError(f"expected one folder of images (--path DIR), got {len(paths)}")
    device = utils.get_device(args.gpu if args.gpu is not None else (0 if torch.cuda.is_available() else -1))
    logits = folder_logits(paths[0], classifier(args.net, args.weights, device), args.batch_size,
                           args.num_workers, device)
    mean, std = inception_score(logits, args.splits, args.shuffle_seed)
    print(f'IS: {mean} +- {std}')
    if args.json:
        utils.atomic_write_text(args.json, json.dumps({'is_mean': mean, 'is_std': std, 'splits': args.splits,
                                                       'net': args.net, 'images': len(logits)}, indent=2))


if __name__ == '__main__':
    utils.run_main(main)
