"""The synthetic dataset's attribute judge: its training, and its accuracy on a folder of images.

  python train_judge.py --cfg cfg/judge_shapes.yml                        -> output/judge
  python train_judge.py --score GEN_DIR --judge output/judge [--json acc.json]

The synthetic dataset has no pretrained judge, so it trains its own (project-defined; it plays
the role of SOA's pretrained detector for COCO, Hinz et al., TPAMI 2020). Its network and loss
are in models.py (ShapesJudge, judge_loss), its scoring in utils.py (judge_accuracy). --score
reads each image's dataset key from keys.json in the folder (what every evaluation's image dump
writes), else from the file's path. The judge's features also serve as "shapes FID":

  python fid_score.py GEN_DIR output/judge/test_stats.npz --judge output/judge
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
    'DATA_DIR': 'data/shapes',  # the judge's training data (attributes.json + CUB layout)
    'JUDGE': {'IMAGE_SIZE': 64, 'WIDTH': 32, 'CELL_DIM': 32},
    'TRAIN': {'EPOCHS': 3, 'BATCH_SIZE': 128, 'LR': 3e-3, 'WEIGHT_DECAY': 1e-4, 'WORKERS': 2},
    # --score reads the folder as fid_score.py reads one (pytorch-fid's defaults)
    'SCORE': {'BATCH_SIZE': 50, 'NUM_WORKERS': -1},  # -1: min(8, CPUs)
}


# ----------------------------------------------------------------------------
# Training
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
    """The whole split in memory once: small images, decoded by `workers` processes."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=250, num_workers=workers)
    xs, ts = zip(*loader)
    return torch.cat(xs), torch.cat(ts)


def train(args):
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
            loss = models.judge_loss(judge(utils.to_judge(x_tr[idx], dev)), t_tr[idx].to(dev))
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


# ----------------------------------------------------------------------------
# Scoring a folder
# ----------------------------------------------------------------------------
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


def score(args):
    """utils.judge_accuracy of a folder's images against their keys' captions; with --json, the
    accuracies, the number of images and the protocol."""
    if not args.judge:
        raise utils.UserError("--score DIR needs --judge (a trained shapes judge)")
    cfg = utils.build_cfg(DEFAULTS, args).SCORE
    gpu = args.gpu if args.gpu is not None else (0 if torch.cuda.is_available() else -1)
    device = utils.get_device(gpu)
    batch_size = args.batch_size or cfg.BATCH_SIZE
    workers = cfg.NUM_WORKERS if args.num_workers is None else args.num_workers
    judge = models.load_judge(args.judge, device)
    files, keys = folder_keys(args.score)
    acc = utils.judge_accuracy(
        judge, (2 * x - 1 for x in utils.batches(files, batch_size, workers, device)), keys
    )
    print('attribute accuracy: ' + ' '.join(f'{k} {v:.4f}' for k, v in acc.items()))
    if args.json:
        protocol = utils.folder_protocol(files, None, judge.resize, {'judge': judge.weights_path})
        result = {'images': len(files), **acc, 'protocol': protocol}
        utils.atomic_write_text(args.json, json.dumps(result, indent=2))


def parse_args():
    p = utils.base_parser(__doc__.splitlines()[0])
    p.add_argument('--score', metavar='DIR', help='attribute accuracy of a folder (with --judge)')
    p.add_argument('--judge', help="--score: the judge (train_judge.py's run dir or checkpoint)")
    p.add_argument('--batch_size', '--batch-size', type=int, help='--score: images at a time')
    p.add_argument('--num_workers', '--num-workers', type=int, help='--score: decoding processes')
    p.add_argument('--json', help='--score: also write the result to this file')
    return p.parse_args()


def main():
    args = parse_args()
    return score(args) if args.score else train(args)


if __name__ == '__main__':
    utils.run_main(main)
