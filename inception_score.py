"""Inception Score (Salimans et al. 2016) as the original improved-GAN code computes it.

  python inception_score.py --path GEN_DIR [--splits 10] [--batch_size 50] [--gpu N] [--weights PATH]
                            [--net tf|torchvision] [--json is.json]
  python inception_score.py --data bird|coco      T2I_CLIP-GAN's preset folder (printed)

IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the split; reported as
mean and std over `splits` consecutive splits (improved-gan inception_score/model.py
get_inception_score). The classifier:
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

import torch

import models
import utils

DEFAULTS = {
    'SPLITS': 10,  # improved-GAN's inception_score(splits=10)
    'BATCH_SIZE': 50,
    'NET': 'tf',
    'NUM_WORKERS': -1,  # -1: min(8, CPUs)
}


@torch.inference_mode()
def folder_logits(path, net, batch_size=50, workers=-1, device='cpu'):
    files = utils.folder_images(path)
    out = [
        net(x).double().cpu()
        for x in utils.progress(
            utils.batches(files, batch_size, workers, device),
            total=-(-len(files) // batch_size),
            desc='IS',
            every=20,
        )
    ]
    return torch.cat(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('paths', nargs='*', help='folder of generated images')
    p.add_argument('--path', help='folder of generated images (as the positional argument)')
    p.add_argument(
        '--data',
        choices=sorted(utils.EVAL_PRESETS),
        help="T2I_CLIP-GAN's preset: the images main.py --cfg cfg/eval_clip_<data>.yml writes",
    )
    p.add_argument('--splits', type=int, default=DEFAULTS['SPLITS'])
    p.add_argument('--batch_size', '--batch-size', type=int, default=DEFAULTS['BATCH_SIZE'])
    p.add_argument('--num_workers', '--num-workers', type=int, default=DEFAULTS['NUM_WORKERS'])
    p.add_argument('--net', choices=['tf', 'torchvision'], default=DEFAULTS['NET'])
    p.add_argument(
        '--weights', help=f'{utils.FID_WEIGHTS} (tf) or {utils.TV_INCEPTION_WEIGHTS} (torchvision)'
    )
    p.add_argument(
        '--gpu', type=int, help='CUDA device; default: cuda:0 when there is one, else CPU'
    )
    p.add_argument(
        '--shuffle_seed', type=int, help='shuffle before splitting (torch-fidelity: 2020)'
    )
    p.add_argument('--json', help='also write the result and its protocol to this file')
    args = p.parse_args()
    paths = ([args.path] if args.path else []) + args.paths
    if args.data:
        if paths:
            raise utils.UserError(f"--data {args.data} names the folder; give no path with it")
        paths = utils.eval_preset(args.data)[:1]
    if args.splits < 1 or args.batch_size < 1:
        raise utils.UserError(
            f"--splits {args.splits} --batch_size {args.batch_size}: expected at least 1 each"
        )
    if len(paths) != 1:
        raise utils.UserError(f"expected one folder of images (--path DIR), got {len(paths)}")
    device = utils.get_device(
        args.gpu if args.gpu is not None else (0 if torch.cuda.is_available() else -1)
    )
    classifier = models.inception_classifier(args.net, args.weights, device)
    logits = folder_logits(paths[0], classifier, args.batch_size, args.num_workers, device)
    mean, std = utils.inception_score(logits, args.splits, args.shuffle_seed)
    print(f'IS: {mean} +- {std}')
    if args.json:
        # the seed: the shuffle before splitting, the score's only draw
        protocol = utils.folder_protocol(
            utils.folder_images(paths[0]),
            args.shuffle_seed,
            models.INCEPTION_RESIZE,
            {'is_inception': classifier.weights_path},
        )
        utils.atomic_write_text(
            args.json,
            json.dumps(
                {
                    'is_mean': mean,
                    'is_std': std,
                    'splits': args.splits,
                    'net': args.net,
                    'images': len(logits),
                    'protocol': protocol,
                },
                indent=2,
            ),
        )


if __name__ == '__main__':
    utils.run_main(main)
