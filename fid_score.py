"""Fréchet Inception Distance equal to pytorch-fid 0.3.0, and the synthetic dataset's judge.

  python fid_score.py GEN_DIR REAL_DIR [--dims 2048] [--batch_size 50] [--gpu N] [--weights PATH]
  python fid_score.py --path GEN_DIR REAL_DIR ...          (the seeds' spelling)
  python fid_score.py --save-stats REAL_DIR real.npz       statistics for later; either side may be an .npz
  python fid_score.py GEN_DIR REAL_DIR --json fid.json     also write the value to a file

The synthetic dataset has no pretrained judge, so it trains its own (ShapesJudge):

  python fid_score.py --train_judge --cfg cfg/judge_shapes.yml       -> output/judge
  python fid_score.py --judge output/judge --accuracy GEN_DIR        attribute accuracy of a folder
  python fid_score.py GEN_DIR output/judge/test_stats.npz --judge output/judge     "shapes FID"

FID (Heusel et al. 2017) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), over the
pool3 (or 64/192/768-d) activations of the TF Inception graph, in float64 (metrics.md).
"""
import itertools
import json
import os
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

import models
import preprocess_data
import utils

DEFAULTS = {
    'CONFIG_NAME': 'judge',
    'FID': {
        'DIMS': 2048,             # pytorch-fid default: pool3 features
        'BATCH_SIZE': 50,         # pytorch-fid default
        'NUM_WORKERS': -1,        # -1: min(8, CPUs), as pytorch-fid
    },
    'DATA_DIR': 'data/shapes',    # the judge's training data (attributes.json + CUB layout)
    'JUDGE': {'IMAGE_SIZE': 64, 'WIDTH': 32, 'CELL_DIM': 32},
    'TRAIN': {'EPOCHS': 3, 'BATCH_SIZE': 128, 'LR': 3e-3, 'WEIGHT_DECAY': 1e-4, 'WORKERS': 2},
}

FID_WEIGHTS = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')


# ----------------------------------------------------------------------------
# Images: a folder (top level, as pytorch-fid) decoded in DataLoader workers
# ----------------------------------------------------------------------------
def folder_images(path):
    """pytorch-fid's file list: the images at the folder's top level. A folder with
    none there (pytorch-fid would fail) is searched recursively (the CUB layout)."""
    files = utils.list_images(path, recursive=False) or utils.list_images(path)
    if not files:
        raise utils.UserError(f"{path}: no images ({', '.join(utils.IMG_EXTENSIONS)})")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """uint8 HWC tensors: small to pass between processes; stacked, they are a
    channels_last batch for free."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(utils.load_image(self.files[i])).copy())


def _stack(items):
    if len({tuple(t.shape) for t in items}) > 1:
        raise utils.UserError(f"images of different sizes in one folder ({sorted({tuple(t.shape) for t in items})}); "
                              "FID batches need one size")
    return torch.stack(items)


def num_workers(n):
    """n < 0: pytorch-fid's default, min(8, available CPUs)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return min(8, cpus) if n < 0 else n


def batches(files, batch_size, workers, device):
    """RGB in [0, 1] (ToTensor's x / 255), (B, 3, H, W) channels_last, on device."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(ImageFiles(files), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers(workers), collate_fn=_stack,
                                         pin_memory=device.type == 'cuda')
    for x in loader:
        yield x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div(255)


# ----------------------------------------------------------------------------
# Feature networks: the FID Inception (pytorch-fid's weights) or the shapes judge
# ----------------------------------------------------------------------------
def weights_path(path, filename, url, hint=''):
    """--weights wins; else torch hub's cache, where pytorch-fid and torchvision keep
    their downloads. Nothing is downloaded here."""
    if path:
        if not os.path.isfile(path):
            raise utils.UserError(f"--weights {path}: file not found")
        return path
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', filename)
    if os.path.isfile(cached):
        return cached
    raise utils.UserError(f"no weights: put {filename} ({url}) in {os.path.dirname(cached)}/ "
                          f"or pass --weights PATH{hint}")


def load_state_dict(net, path):
    """A plain state dict file (torch.load weights_only) into net, strict."""
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise utils.UserError(f"{path}: not a readable weights file ({type(e).__name__}: {e})")
    if not isinstance(sd, dict):
        raise utils.UserError(f"{path}: expected a state dict")
    missing, unexpected = set(net.state_dict()) - set(sd), set(sd) - set(net.state_dict())
    if missing or unexpected:
        raise utils.UserError(f"{path}: not {type(net).__name__} weights (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    net.load_state_dict(sd)
    return net


def fid_inception(weights=None, device='cpu', exact=False):
    """The FID Inception with pytorch-fid's weights: BatchNorm folded and channels_last
    for speed, or (exact) computed as pytorch-fid computes it, bit for bit."""
    path = weights_path(weights, FID_WEIGHTS, FID_WEIGHTS_URL,
                        '; for the synthetic dataset use --judge output/judge instead (shapes FID)')
    net = load_state_dict(models.FIDInceptionV3(), path)
    net = net.eval().requires_grad_(False) if exact else net.fused()
    return net.to(device)


class FeatureNet:
    """images in [0, 1] -> float64 features; `name` keeps saved statistics honest."""

    def __init__(self, fn, dims, name):
        self.fn, self.dims, self.name = fn, dims, name

    @torch.inference_mode()
    def __call__(self, x):
        return self.fn(x).double().cpu().numpy()


def feature_net(dims=2048, weights=None, judge=None, device='cpu', exact=False):
    if judge is not None:
        j = load_judge(judge, device) if isinstance(judge, str) else judge
        dim = j.features(torch.zeros(1, 3, j.image_size, j.image_size, device=device)).shape[1]
        return FeatureNet(lambda x: j.features(2 * x - 1), dim, f'shapes-judge-{dim}')
    if dims not in models.FIDInceptionV3.DIMS:
        raise utils.UserError(f"--dims {dims}: expected one of {models.FIDInceptionV3.DIMS}")
    net = fid_inception(weights, device, exact)
    layout = torch.contiguous_format if exact else torch.channels_last
    return FeatureNet(lambda x: net(x.contiguous(memory_format=layout), dims), dims, f'inception-{dims}')


def activations(files, net, batch_size=50, workers=-1, device='cpu', desc='features'):
    out = np.empty((len(files), net.dims))
    n = 0
    for x in utils.progress(batches(files, batch_size, workers, device), total=-(-len(files) // batch_size),
                            desc=desc, every=20):
        out[n:n + len(x)] = net(x)
        n += len(x)
    return out


# ----------------------------------------------------------------------------
# Statistics and the Fréchet distance
# ----------------------------------------------------------------------------
def statistics(act, name='images'):
    """Mean and covariance in float64 (np.mean / np.cov, as pytorch-fid)."""
    act = np.asarray(act, dtype=np.float64)
    if act.shape[0] <= act.shape[1]:
        warnings.warn(f"{name}: {act.shape[0]} images for {act.shape[1]} features: the covariance is "
                      f"singular and FID is biased and unstable; use more than {act.shape[1]} images "
                      "(the papers use 30,000-50,000)", stacklevel=2)
    if not np.isfinite(act).all():
        raise utils.UserError(f"{name}: non-finite activations (NaN/inf images or weights)")
    return act.mean(axis=0), np.cov(act, rowvar=False)


def path_statistics(path, net, batch_size=50, workers=-1, device='cpu'):
    """(mu, sigma) of a folder of images or of a saved .npz (`mu`, `sigma`)."""
    if path.endswith('.npz'):
        if not os.path.isfile(path):
            raise utils.UserError(f"{path}: statistics file not found")
        with np.load(path) as f:
            if 'mu' not in f or 'sigma' not in f:
                raise utils.UserError(f"{path}: expected arrays 'mu' and 'sigma' (pytorch-fid's .npz)")
            mu, sigma, feature = f['mu'][:], f['sigma'][:], str(f['feature']) if 'feature' in f else None
        if feature is not None and feature != net.name:
            raise utils.UserError(f"{path}: statistics of {feature} features; this run uses {net.name}")
        if mu.shape != (net.dims,):
            raise utils.UserError(f"{path}: {mu.shape[0]}-d statistics; this run uses {net.dims} ({net.name})")
        return mu, sigma
    files = folder_images(path)
    return statistics(activations(files, net, batch_size, workers, device, desc=os.path.basename(path)), path)


def save_statistics(path, mu, sigma, feature):
    np.savez_compressed(path, mu=mu, sigma=sigma, feature=np.array(feature))


def sqrt_eigenvalues(s1, s2):
    """Square roots of the eigenvalues of s1 s2. The product of two covariances is
    similar to s1^1/2 s2 s1^1/2, so its eigenvalues are real and >= 0 in exact
    arithmetic and tr((s1 s2)^1/2) is the sum of their roots; this is the trace
    scipy's sqrtm gives, without forming the square root (torch-fidelity's route)."""
    return np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method='eig'):
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2).
    method 'sqrtm' is pytorch-fid's calculate_frechet_distance: sqrtm, `eps` added to
    both diagonals when the product is singular (sqrtm not finite), the imaginary
    residue dropped unless its diagonal exceeds 1e-3. 'eig' (default, ~5x faster at
    2048-d) sums the roots of the eigenvalues: singular products need no offset (a zero
    eigenvalue has root 0); where the roots keep an imaginary residue over 1e-3 it falls back to
    'sqrtm', so it answers wherever pytorch-fid does, with pytorch-fid's number."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise utils.UserError(f"statistics of different sizes: {mu1.shape[0]}-d and {mu2.shape[0]}-d")
    diff = mu1 - mu2
    if method == 'sqrtm':
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"singular product; adding {eps} to the diagonal of both covariances")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        residue = np.abs(np.diagonal(covmean).imag).max() if np.iscomplexobj(covmean) else 0.0
        tr_covmean = np.trace(covmean).real
    elif method == 'eig':
        roots = sqrt_eigenvalues(sigma1, sigma2)
        residue, tr_covmean = np.abs(roots.imag).max(), roots.real.sum()
        if residue > 1e-3:      # rank-deficient covariances (fewer images than dims): the eigenvalues
            # of S1 S2 carry rounding noise; pytorch-fid's route answers these cases, so take it
            return frechet_distance(mu1, sigma1, mu2, sigma2, eps, 'sqrtm')
    else:
        raise ValueError(method)
    if residue > 1e-3:
        raise utils.UserError(f"imaginary component {residue:.3g} in the square root of S1 S2 (pytorch-fid "
                              "refuses these statistics too); compute them from more images")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------
# The shapes judge: data, training, attribute accuracy
# ----------------------------------------------------------------------------
SHAPES, COLOURS, SIZES = preprocess_data.SHAPES, list(preprocess_data.COLOURS), list(preprocess_data.SIZES)
ATTRIBUTES = ('shape', 'colour', 'size')
KEY_RE = re.compile(r'(\d{3}\.[a-z]+_[a-z]+)[/\\]([a-z]+_[a-z]+_\d{5})')


def caption_attributes(data_dir):
    """attributes.json reduced to what the captions name: each object's shape,
    colour, size and cell (reading order) and the relation of object 1 to object 2."""
    path = os.path.join(data_dir, 'attributes.json')
    if not os.path.isfile(path):
        raise utils.UserError(f"{path}: missing (the synthetic dataset's ground truth; "
                              "python preprocess_data.py --cfg cfg/preprocess/shapes.yml)")
    with open(path) as f:
        attrs = json.load(f)
    return {k: {'objects': [{a: o[a] for a in ATTRIBUTES + ('cell',)} for o in v['objects']],
                'relation': v['relation']} for k, v in attrs.items()}


def shapes_key(path):
    """The dataset key (NNN.colour_shape/colour_shape_NNNNN) named in an image's path."""
    m = KEY_RE.search(path.replace(os.sep, '/'))
    if not m:
        raise utils.UserError(f"{path}: no shapes key (<NNN.colour_shape>/<colour_shape_NNNNN>) in the "
                              "path; list each file's key in keys.json in the folder")
    return f'{m.group(1)}/{m.group(2)}'


def cell_targets(scene):
    """(9, 4): occupied, shape, colour, size index per cell (-1 where empty)."""
    t = torch.full((9, 4), -1, dtype=torch.long)
    t[:, 0] = 0
    for o in scene['objects']:
        t[o['cell']] = torch.tensor([1, SHAPES.index(o['shape']), COLOURS.index(o['colour']),
                                     SIZES.index(o['size'])])
    return t


class JudgeImages(torch.utils.data.Dataset):
    """Real images resized to the judge's input (uint8) and their cell targets."""

    def __init__(self, data_dir, keys, attrs, size):
        self.paths = [os.path.join(data_dir, 'CUB_200_2011', 'images', k + '.jpg') for k in keys]
        self.targets = [cell_targets(attrs[k]) for k in keys]
        self.size = size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x = torch.from_numpy(np.asarray(utils.load_image(self.paths[i])).copy()).permute(2, 0, 1)
        x = F.interpolate(x[None].float(), size=(self.size, self.size), mode='bilinear',
                          align_corners=False, antialias=True)[0]
        return x.round().clamp(0, 255).to(torch.uint8), self.targets[i]


def preload(dataset, workers):
    loader = torch.utils.data.DataLoader(dataset, batch_size=250, num_workers=workers)
    xs, ts = zip(*loader)
    return torch.cat(xs), torch.cat(ts)


def to_judge(x_uint8, device):
    return (x_uint8.to(device).float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)


def judge_loss(out, t):
    """Objectness (BCE) on all 9 cells; shape, colour, size (CE) on occupied cells."""
    occ, shape, colour, size = out
    full = t[..., 0] == 1
    return (F.binary_cross_entropy_with_logits(occ[..., 0], full.float())
            + F.cross_entropy(shape[full], t[full][:, 1]) + F.cross_entropy(colour[full], t[full][:, 2])
            + F.cross_entropy(size[full], t[full][:, 3]))


@torch.inference_mode()
def judge_predict(judge, images):
    """The objects the judge sees in a batch (RGB in [-1, 1]), reading order."""
    dev = next(judge.parameters()).device
    occ, shape, colour, size = judge(images.to(dev).float().contiguous(memory_format=torch.channels_last))
    occ, shape, colour, size = occ[..., 0] > 0, shape.argmax(-1), colour.argmax(-1), size.argmax(-1)
    return [[{'cell': c, 'shape': SHAPES[shape[n, c]], 'colour': COLOURS[colour[n, c]],
              'size': SIZES[size[n, c]]} for c in occ[n].nonzero()[:, 0].tolist()] for n in range(len(occ))]


def relation_holds(relation, cell1, cell2):
    """The caption's relation of object 1 to object 2, read on the named axis of the
    judged cells: 'to the left of' = a column left of object 2's, 'above' = a row above."""
    (r1, c1), (r2, c2) = divmod(cell1, 3), divmod(cell2, 3)
    return {'to the left of': c1 < c2, 'to the right of': c1 > c2, 'above': r1 < r2, 'below': r1 > r2}[relation]


def judge_scene(pred, truth):
    """One image against its caption's attributes. Caption objects are matched to the
    judged objects one to one, maximising (attribute hits, position correct); a caption
    object left unmatched misses every attribute."""
    objs, best = truth['objects'], None
    for perm in itertools.permutations(range(len(pred)), min(len(objs), len(pred))):
        hits = [[pred[p][a] == objs[j][a] for a in ATTRIBUTES] for j, p in enumerate(perm)]
        hits += [[False] * len(ATTRIBUTES)] * (len(objs) - len(perm))
        if len(pred) != len(objs):     # extra (or missing) objects: no position credit, or an image
            position = False            # of objects everywhere would have every lone object's cell
        elif len(objs) == 1:
            position = pred[perm[0]]['cell'] == objs[0]['cell']
        else:
            position = relation_holds(truth['relation'], pred[perm[0]]['cell'], pred[perm[1]]['cell'])
        score = (sum(map(sum, hits)), position)
        if best is None or score > best[0]:
            best = (score, hits, position)
    _, hits, position = best
    return {'count': len(pred) == len(objs), 'hits': hits, 'position': position,
            'all': len(pred) == len(objs) and position and all(map(all, hits))}


def scene_reason(pred, truth, scene):
    """Why an image fails its caption, in words (the first failing check), or ''."""
    objs = truth['objects']
    if not scene['count']:
        return f"count: the judge sees {len(pred)} object(s), the caption names {len(objs)}"
    for j, hits in enumerate(scene['hits']):
        for a, hit in zip(ATTRIBUTES, hits):
            if not hit:
                return f"{a} of object {j + 1}: the caption says {objs[j][a]}"
    if not scene['position']:
        return f"position: not {truth['relation']}" if len(objs) == 2 else \
            f"position: object not in cell {objs[0]['cell']} (reading order)"
    return ''


BREAKDOWN = ('single_object', 'two_objects', 'counting', 'colours', 'position', 'colour_attribution')


def judge_breakdown(scenes, truths):
    """A compositional breakdown in the style of GenEval (Ghosh et al. 2023), each category the
    share of its images that pass: single object (one-object captions: one object of the named
    shape), two objects (two-object captions: two objects, both shapes right), counting (the
    number of objects, every caption), colours (one-object captions: shape and colour right),
    position (the lone object's cell or the pair's relation), colour attribution (two-object
    captions: each object in its own colour)."""
    one = [(s, t) for s, t in zip(scenes, truths) if len(t['objects']) == 1]
    two = [(s, t) for s, t in zip(scenes, truths) if len(t['objects']) == 2]
    i_shape, i_colour = ATTRIBUTES.index('shape'), ATTRIBUTES.index('colour')

    def share(pairs, ok):
        return float(np.mean([ok(s) for s, _ in pairs])) if pairs else None
    return {'single_object': share(one, lambda s: s['count'] and s['hits'][0][i_shape]),
            'two_objects': share(two, lambda s: s['count'] and all(h[i_shape] for h in s['hits'])),
            'counting': share(list(zip(scenes, truths)), lambda s: s['count']),
            'colours': share(one, lambda s: s['count'] and s['hits'][0][i_shape] and s['hits'][0][i_colour]),
            'position': share(list(zip(scenes, truths)), lambda s: s['position']),
            'colour_attribution': share(two, lambda s: s['count'] and all(h[i_shape] and h[i_colour]
                                                                          for h in s['hits']))}


def judge_accuracy(judge, images, keys, attributes=None, records=None):
    """Attribute accuracy of images against the captions of `keys` (their attributes.json
    entries; default: those stored in the judge). images: (N, 3, H, W) in [-1, 1] or an
    iterable of such batches. Returns accuracies in [0, 1]: count (images), shape /
    colour / size (caption objects), position (images: the cell of a lone object, the
    relation of a pair), all (images with every one of these right); and judge_breakdown's
    categories. With `records` (a list), one entry per image is appended: its key, category
    ('one object' / 'two objects'), whether all is right, and why not."""
    attributes = judge.attributes if attributes is None else attributes
    missing = [k for k in keys if k not in attributes]
    if missing:
        raise utils.UserError(f"{missing[0]}: not a key of the judge's dataset ({len(missing)} unknown keys)")
    chunks = torch.split(images, 250) if torch.is_tensor(images) else images
    preds = [p for x in chunks for p in judge_predict(judge, x)]
    if len(preds) != len(keys):
        raise utils.UserError(f"{len(preds)} images for {len(keys)} keys")
    scenes = [judge_scene(p, attributes[k]) for p, k in zip(preds, keys)]
    hits = np.array([h for s in scenes for h in s['hits']], dtype=np.float64)
    out = {'count': np.mean([s['count'] for s in scenes])}
    out.update({a: hits[:, i].mean() for i, a in enumerate(ATTRIBUTES)})
    out.update(position=np.mean([s['position'] for s in scenes]), all=np.mean([s['all'] for s in scenes]))
    truths = [attributes[k] for k in keys]
    if records is not None:
        records += [{'key': k, 'category': 'one object' if len(t['objects']) == 1 else 'two objects',
                     'correct': bool(s['all']), 'reason': scene_reason(p, t, s)}
                    for k, p, t, s in zip(keys, preds, truths, scenes)]
    out = {k: float(v) for k, v in out.items()}
    return {**out, **{f'breakdown_{k}': v for k, v in judge_breakdown(scenes, truths).items()}}


def load_judge(path, device='cpu'):
    """A trained judge from its run dir or checkpoint; it carries its dataset's attributes."""
    if os.path.isdir(path):
        path = os.path.join(path, 'checkpoints', 'judge_final.pt')
    ckpt = utils.load_checkpoint(path, 'judge')
    judge = models.ShapesJudge(**ckpt['extra']['model'])
    judge.load_state_dict(ckpt['models']['judge'])
    judge.attributes = ckpt['extra']['attributes']
    return judge.to(device).eval().requires_grad_(False)


def train_judge(args):
    run = utils.setup(args, DEFAULTS)
    cfg, log, dev = run.cfg, run.log, run.device
    attrs = caption_attributes(cfg.DATA_DIR)
    keys = {s: utils.read_attngan_split(cfg.DATA_DIR, s) for s in ('train', 'test')}
    log.info(f"loading {len(keys['train'])} train / {len(keys['test'])} test images at {cfg.JUDGE.IMAGE_SIZE} px")
    (x_tr, t_tr), (x_te, _) = [preload(JudgeImages(cfg.DATA_DIR, keys[s], attrs, cfg.JUDGE.IMAGE_SIZE),
                                       cfg.TRAIN.WORKERS) for s in ('train', 'test')]
    spec = {'n_shapes': len(SHAPES), 'n_colours': len(COLOURS), 'n_sizes': len(SIZES),
            'width': cfg.JUDGE.WIDTH, 'cell_dim': cfg.JUDGE.CELL_DIM, 'image_size': cfg.JUDGE.IMAGE_SIZE}
    judge = models.ShapesJudge(**spec).to(dev, memory_format=torch.channels_last)
    bs, steps = cfg.TRAIN.BATCH_SIZE, len(x_tr) // cfg.TRAIN.BATCH_SIZE
    opt = torch.optim.AdamW(judge.parameters(), cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.TRAIN.LR, total_steps=cfg.TRAIN.EPOCHS * steps)
    step, epoch = 0, 0
    ckpt = utils.resolve_resume(args.resume, run.out, 'judge', log, run.cfg)
    if ckpt is not None:
        step, epoch = utils.restore_checkpoint(ckpt, {'judge': judge}, {'opt': opt}, {'sched': sched})
    test_batches = lambda: (to_judge(x, dev) for x in torch.split(x_te, 250))   # noqa: E731
    while epoch < cfg.TRAIN.EPOCHS:
        judge.train()
        perm = torch.randperm(len(x_tr))
        bar = utils.progress(range(steps), desc=f'judge epoch {epoch + 1}', every=20, log=log)
        for i in bar:
            idx = perm[i * bs:(i + 1) * bs]
            loss = judge_loss(judge(to_judge(x_tr[idx], dev)), t_tr[idx].to(dev))
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
        acc = judge_accuracy(judge, test_batches(), keys['test'], attrs)
        log.info(f"epoch {epoch}: held-out real test images: " + ' '.join(f'{k} {v:.4f}' for k, v in acc.items()))
        utils.save_checkpoint(run.out, 'judge', step, {'judge': judge}, {'opt': opt}, {'sched': sched},
                              epoch=epoch, cfg=cfg, keep=1)
    judge.eval()
    acc = judge_accuracy(judge, test_batches(), keys['test'], attrs)
    shuffled = [keys['test'][i] for i in np.random.RandomState(cfg.SEED).permutation(len(keys['test']))]
    wrong = judge_accuracy(judge, test_batches(), shuffled, attrs)
    with torch.inference_mode():
        feats = np.concatenate([judge.features(x).double().cpu().numpy() for x in test_batches()])
    save_statistics(os.path.join(run.out, 'test_stats.npz'), *statistics(feats, 'real test images'),
                    f'shapes-judge-{feats.shape[1]}')
    utils.save_checkpoint(run.out, 'judge', step, {'judge': judge}, cfg=cfg, epoch=epoch, name='judge_final.pt',
                          extra={'model': spec, 'attributes': attrs, 'heldout': acc})
    metrics = {f'heldout_{k}': v for k, v in acc.items()}
    metrics.update({f'wrong_caption_{k}': v for k, v in wrong.items()})
    utils.write_metrics(run.out, {**metrics, 'epochs': epoch, 'feature_dim': int(feats.shape[1])})
    log.info("real images, shuffled captions: " + ' '.join(f'{k} {v:.4f}' for k, v in wrong.items()))
    log.info(f"judge: {run.out}/checkpoints/judge_final.pt; shapes FID reference: {run.out}/test_stats.npz")


def folder_keys(folder):
    """Each image's dataset key: from keys.json ({file relative to the folder: key})
    when the folder has one, else from the path (shapes_key)."""
    files = utils.list_images(folder)
    mapping = os.path.join(folder, 'keys.json')
    if os.path.isfile(mapping):
        with open(mapping) as f:
            table = json.load(f)
        rel = [os.path.relpath(p, folder) for p in files]
        missing = [r for r in rel if r not in table]
        if missing:
            raise utils.UserError(f"{mapping}: no key for {missing[0]} ({len(missing)} files without one)")
        return files, [table[r] for r in rel]
    return files, [shapes_key(p) for p in files]


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def parse_args():
    p = utils.base_parser(__doc__.splitlines()[0])
    p.add_argument('paths', nargs='*', help='two folders or .npz files (or DIR OUT.npz with --save-stats)')
    p.add_argument('--path', nargs=2, help='the seeds\' spelling of the two paths')
    p.add_argument('--dims', type=int, help=f'Inception features: {models.FIDInceptionV3.DIMS}')
    p.add_argument('--batch_size', '--batch-size', type=int)
    p.add_argument('--num_workers', '--num-workers', type=int, help='decoding processes')
    p.add_argument('--weights', help=f'FID Inception weights ({FID_WEIGHTS})')
    p.add_argument('--save-stats', '--save_stats', dest='save_stats', action='store_true',
                   help='write the statistics of the first path to the second (.npz)')
    p.add_argument('--json', help='also write the result to this file')
    p.add_argument('--exact', action='store_true', help="pytorch-fid's arithmetic bit for bit (slower): "
                   "no BatchNorm folding, NCHW, scipy's sqrtm")
    p.add_argument('--judge', help='shapes judge (run dir or checkpoint): its features instead of Inception')
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
        judge = load_judge(args.judge, device)
        files, keys = folder_keys(args.accuracy)
        acc = judge_accuracy(judge, (2 * x - 1 for x in batches(files, batch_size, workers, device)), keys)
        print('attribute accuracy: ' + ' '.join(f'{k} {v:.4f}' for k, v in acc.items()))
        return report({'images': len(files), **acc}, args.json)
    paths = args.path or args.paths
    if len(paths) != 2:
        raise utils.UserError(f"expected two paths (GEN_DIR REAL_DIR, or --save-stats DIR OUT.npz), got {len(paths)}")
    if args.judge and args.dims:
        raise utils.UserError("--dims is for the Inception; the judge has its own feature size")
    net = feature_net(args.dims or cfg.DIMS, args.weights, args.judge, device, args.exact)
    if args.save_stats:
        if os.path.exists(paths[1]):
            raise utils.UserError(f"{paths[1]}: exists; not overwriting statistics")
        mu, sigma = path_statistics(paths[0], net, batch_size, workers, device)
        save_statistics(paths[1], mu, sigma, net.name)
        print(f"saved {net.name} statistics of {paths[0]} to {paths[1]}")
        return
    for p in paths:
        if not os.path.exists(p):
            raise utils.UserError(f"{p}: not found")
    stats = [path_statistics(p, net, batch_size, workers, device) for p in paths]
    fid = frechet_distance(*stats[0], *stats[1], method='sqrtm' if args.exact else 'eig')
    print('FID: ', fid)
    report({'fid': fid, 'paths': paths, 'features': net.name}, args.json)


if __name__ == '__main__':
    utils.run_main(main)
