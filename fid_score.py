"""Fréchet Inception Distance equal to pytorch-fid 0.3.0, and the synthetic dataset's judge.

  python fid_score.py GEN_DIR REAL_DIR [--dims 2048] [--batch_size 50] [--gpu N] [--weights PATH]
  python fid_score.py --path GEN_DIR REAL_DIR ...          (the same, as one flag)
  python fid_score.py --save-stats REAL_DIR real.npz       statistics for later; either side may be an .npz
  python fid_score.py GEN_DIR REAL_DIR --json fid.json     also write the value to a file
  python fid_score.py --data bird|coco                     T2I_CLIP-GAN's preset folders (printed)

The synthetic dataset has no pretrained judge, so it trains its own (ShapesJudge):

  python fid_score.py --train_judge --cfg cfg/judge_shapes.yml       -> output/judge
  python fid_score.py --judge output/judge --accuracy GEN_DIR        attribute accuracy of a folder
  python fid_score.py GEN_DIR output/judge/test_stats.npz --judge output/judge     "shapes FID"

FID (Heusel et al. 2017) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), over the
pool3 (or 64/192/768-d) activations of the TF Inception graph, in float64 (pytorch-fid fid_score.py
calculate_activation_statistics, calculate_frechet_distance).
The computation is shared with the other scripts (utils.py: statistics, Fréchet distance, the
judge's scoring; models.py: the networks); here are its command line and the judge's training.
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import models
import utils

DEFAULTS = {
    'CONFIG_NAME': 'judge',
    'FID': {
        'DIMS': 2048,  # pytorch-fid default: pool3 features
        'BATCH_SIZE': 50,  # pytorch-fid default
        'NUM_WORKERS': -1,  # -1: min(8, CPUs), as pytorch-fid
    },
    'DATA_DIR': 'data/shapes',  # the judge's training data (attributes.json + CUB layout)
    'JUDGE': {'IMAGE_SIZE': 64, 'WIDTH': 32, 'CELL_DIM': 32},
    'TRAIN': {'EPOCHS': 3, 'BATCH_SIZE': 128, 'LR': 3e-3, 'WEIGHT_DECAY': 1e-4, 'WORKERS': 2},
}


# ----------------------------------------------------------------------------
# The shapes judge's training (its scoring: utils.py, Metrics: the shapes judge)
# ----------------------------------------------------------------------------
class JudgeImages(torch.utils.data.Dataset):
    """Real images resized to the judge's input (uint8) and their cell targets."""

    def __init__(self, data_dir, keys, attrs, size):
        self.paths = [os.path.join(data_dir, 'CUB_200_2011', 'images', k + '.jpg') for k in keys]
        self.targets = [utils.cell_targets(attrs[k]) for k in keys]
        self.size = size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x = torch.from_numpy(np.asarray(utils.load_image(self.paths[i])).copy()).permute(2, 0, 1)
        x = F.interpolate(
            x[None].float(),
            size=(self.size, self.size),
            mode='bilinear',
            align_corners=False,
            antialias=True,
        )[0]
        return x.round().clamp(0, 255).to(torch.uint8), self.targets[i]


def preload(dataset, workers):
    loader = torch.utils.data.DataLoader(dataset, batch_size=250, num_workers=workers)
    xs, ts = zip(*loader)
    return torch.cat(xs), torch.cat(ts)


def judge_loss(out, t):
    """Objectness (BCE) on all 9 cells; shape, colour, size (CE) on occupied cells."""
    occ, shape, colour, size = out
    full = t[..., 0] == 1
    return (
        F.binary_cross_entropy_with_logits(occ[..., 0], full.float())
        + F.cross_entropy(shape[full], t[full][:, 1])
        + F.cross_entropy(colour[full], t[full][:, 2])
        + F.cross_entropy(size[full], t[full][:, 3])
    )


def train_judge(args):
    run = utils.setup(args, DEFAULTS)
    cfg, log, dev = run.cfg, run.log, run.device
    attrs = utils.caption_attributes(cfg.DATA_DIR)
    keys = {s: utils.read_attngan_split(cfg.DATA_DIR, s) for s in ('train', 'test')}
    log.info(
        f"loading {len(keys['train'])} train / {len(keys['test'])} test images at {cfg.JUDGE.IMAGE_SIZE} px"
    )
    (x_tr, t_tr), (x_te, _) = [
        preload(JudgeImages(cfg.DATA_DIR, keys[s], attrs, cfg.JUDGE.IMAGE_SIZE), cfg.TRAIN.WORKERS)
        for s in ('train', 'test')
    ]
    spec = {
        'n_shapes': len(utils.SHAPES),
        'n_colours': len(utils.COLOURS),
        'n_sizes': len(utils.SIZES),
        'width': cfg.JUDGE.WIDTH,
        'cell_dim': cfg.JUDGE.CELL_DIM,
        'image_size': cfg.JUDGE.IMAGE_SIZE,
    }
    judge = models.ShapesJudge(**spec).to(dev, memory_format=torch.channels_last)
    bs, steps = cfg.TRAIN.BATCH_SIZE, len(x_tr) // cfg.TRAIN.BATCH_SIZE
    opt = torch.optim.AdamW(judge.parameters(), cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, cfg.TRAIN.LR, total_steps=cfg.TRAIN.EPOCHS * steps
    )
    step, epoch = 0, 0
    ckpt = utils.resolve_resume(args.resume, run.out, 'judge', log, run.cfg)
    if ckpt is not None:
        step, epoch = utils.restore_checkpoint(
            ckpt, {'judge': judge}, {'opt': opt}, {'sched': sched}
        )

    def test_batches():
        return (utils.to_judge(x, dev) for x in torch.split(x_te, 250))

    while epoch < cfg.TRAIN.EPOCHS:
        judge.train()
        perm = torch.randperm(len(x_tr))
        bar = utils.progress(range(steps), desc=f'judge epoch {epoch + 1}', every=20, log=log)
        for i in bar:
            idx = perm[i * bs : (i + 1) * bs]
            loss = judge_loss(judge(utils.to_judge(x_tr[idx], dev)), t_tr[idx].to(dev))
            utils.check_finite(loss, 'judge', step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.set_postfix(loss=loss.item())
        run.writer.add_scalar('judge/loss', loss.item(), step)
        epoch += 1
        judge.eval()
        acc = utils.judge_accuracy(judge, test_batches(), keys['test'], attrs)
        log.info(
            f"epoch {epoch}: held-out real test images: "
            + ' '.join(f'{k} {v:.4f}' for k, v in acc.items())
        )
        utils.save_checkpoint(
            run.out,
            'judge',
            step,
            {'judge': judge},
            {'opt': opt},
            {'sched': sched},
            epoch=epoch,
            cfg=cfg,
            keep=1,
        )
    judge.eval()
    acc = utils.judge_accuracy(judge, test_batches(), keys['test'], attrs)
    shuffled = [
        keys['test'][i] for i in np.random.RandomState(cfg.SEED).permutation(len(keys['test']))
    ]
    wrong = utils.judge_accuracy(judge, test_batches(), shuffled, attrs)
    with torch.inference_mode():
        feats = np.concatenate([judge.features(x).double().cpu().numpy() for x in test_batches()])
    utils.save_statistics(
        os.path.join(run.out, 'test_stats.npz'),
        *utils.statistics(feats, 'real test images'),
        f'shapes-judge-{feats.shape[1]}',
    )
    utils.save_checkpoint(
        run.out,
        'judge',
        step,
        {'judge': judge},
        cfg=cfg,
        epoch=epoch,
        name='judge_final.pt',
        extra={'model': spec, 'attributes': attrs, 'heldout': acc},
    )
    metrics = {f'heldout_{k}': v for k, v in acc.items()}
    metrics.update({f'wrong_caption_{k}': v for k, v in wrong.items()})
    utils.write_metrics(run.out, {**metrics, 'epochs': epoch, 'feature_dim': int(feats.shape[1])})
    log.info(
        "real images, shuffled captions: " + ' '.join(f'{k} {v:.4f}' for k, v in wrong.items())
    )
    log.info(
        f"judge: {run.out}/checkpoints/judge_final.pt; shapes FID reference: {run.out}/test_stats.npz"
    )


def folder_keys(folder):
    """Each image's dataset key: from keys.json ({file relative to the folder: key})
    when the folder has one, else from the path (utils.shapes_key)."""
    files = utils.list_images(folder)
    mapping = os.path.join(folder, 'keys.json')
    if os.path.isfile(mapping):
        with open(mapping) as f:
            table = json.load(f)
        rel = [os.path.relpath(p, folder) for p in files]
        missing = [r for r in rel if r not in table]
        if missing:
            raise utils.UserError(
                f"{mapping}: no key for {missing[0]} ({len(missing)} files without one)"
            )
        return files, [table[r] for r in rel]
    return files, [utils.shapes_key(p) for p in files]


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
    p.add_argument('--json', help='also write the result to this file')
    p.add_argument(
        '--exact',
        action='store_true',
        help="pytorch-fid's arithmetic bit for bit (slower): "
        "no BatchNorm folding, NCHW, scipy's sqrtm",
    )
    p.add_argument(
        '--judge', help='shapes judge (run dir or checkpoint): its features instead of Inception'
    )
    p.add_argument('--accuracy', metavar='DIR', help='with --judge: attribute accuracy of a folder')
    p.add_argument('--train_judge', action='store_true', help='train the shapes judge (--cfg)')
    return p.parse_args()


def report(result, path):
    if path:
        utils.atomic_write_text(path, json.dumps(result, indent=2))


def main():
    args = parse_args()
    if args.train_judge:
        return train_judge(args)
    cfg = utils.build_cfg(DEFAULTS, args).FID
    gpu = args.gpu if args.gpu is not None else (0 if torch.cuda.is_available() else -1)
    device = utils.get_device(gpu)
    batch_size = args.batch_size or cfg.BATCH_SIZE
    workers = cfg.NUM_WORKERS if args.num_workers is None else args.num_workers
    if args.accuracy:
        if not args.judge:
            raise utils.UserError("--accuracy DIR needs --judge (a trained shapes judge)")
        judge = models.load_judge(args.judge, device)
        files, keys = folder_keys(args.accuracy)
        acc = utils.judge_accuracy(
            judge, (2 * x - 1 for x in utils.batches(files, batch_size, workers, device)), keys
        )
        print('attribute accuracy: ' + ' '.join(f'{k} {v:.4f}' for k, v in acc.items()))
        return report({'images': len(files), **acc}, args.json)
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
    report({'fid': fid, 'paths': paths, 'features': net.name}, args.json)


if __name__ == '__main__':
    utils.run_main(main)
