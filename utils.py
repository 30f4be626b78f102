"""Shared plumbing for every t2i-repro script: config, CLI, device, seeding,
distributed, logging, metrics, checkpoints and the data readers.

Scripts read top to bottom like their paper; everything that is not the paper
lives here, once.
"""

import argparse
import atexit
import collections
import csv
import difflib
import hashlib
import inspect
import io
import itertools
import json
import logging
import math
import os
import pickle
import random
import re
import sys
import time
import warnings

import numpy as np
import torch
import yaml


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def worker_error_line(e):
    """The original error's last line when `e` was re-raised from a DataLoader worker (whose
    message then holds the worker's whole traceback), else None."""
    text = str(e)
    if not (text.startswith('Caught ') and 'DataLoader worker' in text.split('\n', 1)[0]):
        return None
    last = text.strip().splitlines()[-1]
    name, _, message = last.partition(': ')
    return message if name.split('.')[-1] in ('UserError', 'BadImage') else last


def run_main(fn):
    """Call fn(); turn UserError, and any error of a DataLoader worker (an unreadable image,
    images of mixed sizes), into a one-line message and a non-zero exit."""
    code = 0
    try:
        fn()
        # ranks leave together: one tearing gloo down while rank 0 still writes its checkpoint
        # can abort the process ("terminate called without an active exception")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
    except UserError as e:
        print(f"error: {worker_error_line(e) or e}", file=sys.stderr)
        code = 2
    except Exception as e:
        line = worker_error_line(e)
        if line is None:
            raise
        print(f"error: in a data-loading worker: {line}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        distributed = cleanup_distributed()
    if distributed:
        exit_before_finalizing(code)
    if code:
        sys.exit(code)


def exit_before_finalizing(code):
    """Leave a process that ran collectives without the interpreter's finalization. A DDP
    reducer keeps the gloo group, and its worker threads, alive past destroy_process_group; a
    worker that lets go of the last collective's tensor during finalization needs the GIL and
    aborts the process (SIGABRT). The exit handlers (TensorBoard's close among them) run first."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------
# Config: defaults in one dict per script, YAML merged over them, --set on top.
# ----------------------------------------------------------------------------
class Cfg(dict):
    """A dict with attribute access (cfg.TRAIN.BATCH_SIZE), nested."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None

    def __setattr__(self, k, v):
        self[k] = v

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, Cfg) else v for k, v in self.items()}


def to_cfg(d):
    return Cfg({k: to_cfg(v) if isinstance(v, dict) else v for k, v in d.items()})


def _check_type(key, default, value, source):
    """Values must keep the default's type (int may stand for float; None means any)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key}={value!r}: expected true/false")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value)
    if type(default) is not type(value):
        raise UserError(
            f"{source}: {key}={value!r}: expected {type(default).__name__} "
            f"like the default {default!r}"
        )
    return value


# Value rules by key name, checked where the cfg is read (so a bad value is one line naming it,
# not a traceback many steps later): (test on the leaf name, check, what is expected).
_VALUE_RULES = (
    (lambda leaf: leaf.endswith('BATCH_SIZE'), lambda v: v >= 1, 'at least 1'),
    (
        lambda leaf: leaf in ('LR', 'LEARNING_RATE') or leaf.endswith('_LR'),
        lambda v: math.isfinite(v) and v >= 0,
        'a finite learning rate >= 0',
    ),
    (
        lambda leaf: (
            leaf
            in (
                'EPOCHS',
                'MAX_EPOCH',
                'MAX_STEPS',
                'WORKERS',
                'NUM_IMAGES',
                'KEEP_CHECKPOINTS',
                'KEEP_N_CHECKPOINTS',
            )
        ),
        lambda v: v >= 0,
        '>= 0',
    ),
    (
        lambda leaf: (
            leaf in ('SPLITS', 'SNAPSHOT_INTERVAL', 'LOG_EVERY', 'CAPTIONS_PER_IMAGE', 'R_FOLDS')
        ),
        lambda v: v >= 1,
        'at least 1',
    ),
    (
        lambda leaf: leaf == 'TOP_K',
        lambda v: math.isfinite(v) and v >= 0,
        'a share in [0, 1) or a count >= 1',
    ),
    (
        lambda leaf: leaf.endswith('DECAY') and not leaf.startswith('LR'),
        lambda v: 0 <= v <= 1,
        'in [0, 1]',
    ),
)


def _check_value(key, value, source):
    leaf = key.split('.')[-1]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    for applies, ok, expected in _VALUE_RULES:
        if applies(leaf) and not ok(value):
            raise UserError(f"{source}: {key}={value!r}: expected {expected}")
    return value


def _unknown_key(key, valid, source):
    """Name the closest valid keys: full dotted paths, matched on the whole path and on the leaf."""
    leaf = key.split('.')[-1]
    close = difflib.get_close_matches(key, valid, n=3) + [
        v
        for v in valid
        if v.split('.')[-1]
        in difflib.get_close_matches(leaf, [v.split('.')[-1] for v in valid], n=3)
    ]
    full = list(dict.fromkeys(close))[:3]
    hint = f"; did you mean {', '.join(full)}?" if full else ""
    raise UserError(f"{source}: unknown cfg key '{key}'{hint}")


def _flat_keys(d, prefix=''):
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _flat_keys(v, prefix + k + '.')
    return out


def merge_cfg(base, override, source, prefix=''):
    """Merge dict `override` into Cfg `base` in place; unknown keys are errors."""
    for k, v in override.items():
        key = prefix + str(k)
        if k not in base:
            _unknown_key(key, _flat_keys(base, prefix), source)
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise UserError(f"{source}: {key} is a section; expected a mapping, got {v!r}")
            merge_cfg(base[k], v, source, key + '.')
        else:
            base[k] = _check_value(key, _check_type(key, base[k], v, source), source)
    return base


def apply_set(cfg, assignments):
    """--set A.B=VALUE (VALUE parsed as a YAML scalar/list)."""
    for item in assignments or []:
        if '=' not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split('=', 1)
        try:
            value = yaml.safe_load(raw) if raw != '' else ''
        except yaml.YAMLError:
            value = raw
        node = value
        for part in reversed(key.split('.')):
            node = {part: node}
        merge_cfg(cfg, node, '--set')
    return cfg


def load_yaml(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: cfg file not found")
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        data = yaml.safe_load(raw.decode('utf-8')) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the cfg as UTF-8")
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of cfg keys at the top level")
    return data


# Keys every script's cfg has; the common flags write into them.
COMMON_DEFAULTS = {
    'CONFIG_NAME': '',  # names the run directory when OUT_DIR is empty
    'OUT_DIR': '',  # run directory (--out)
    'SEED': 0,  # --seed
    'GPU_ID': -1,  # --gpu; -1 = CPU
    'DETERMINISTIC': False,
    # torch's intra-op CPU threads (0: torch's default, one per core). 1 for each of several jobs
    # sharing the cores: beside another job, the embedded DM-GAN stepped 4x faster on one
    # thread than on two (bench/threads.py measures it on an idle machine).
    'CPU_THREADS': 0,
}


def base_parser(description, positional=None):
    """The flags every script shares. `positional` adds script-specific ones."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--cfg', help='YAML file merged over the defaults')
    p.add_argument(
        '--set',
        action='append',
        default=[],
        metavar='KEY=VALUE',
        help='override one cfg key (dotted for sections; repeatable)',
    )
    p.add_argument('--gpu', type=int, default=None, help='CUDA device index; -1 = CPU')
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--out', default=None, help='run directory')
    p.add_argument(
        '--resume', default=None, help="'auto' (newest checkpoint in the run dir) or a path"
    )
    p.add_argument(
        '--overwrite',
        action='store_true',
        help='clear a run dir that holds checkpoints (else such a dir is refused without --resume)',
    )
    p.add_argument('--deterministic', action='store_true', default=None)
    # python -m torch.distributed.launch (the older launcher) passes the local rank as a flag;
    # torchrun sets LOCAL_RANK, which is what get_device reads.
    p.add_argument(
        '--local-rank',
        '--local_rank',
        dest='local_rank',
        type=int,
        default=None,
        help=argparse.SUPPRESS,
    )
    return p


def build_cfg(defaults, args):
    """defaults <- YAML (--cfg) <- common flags <- --set."""
    if getattr(args, 'local_rank', None) is not None:
        os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = to_cfg({**COMMON_DEFAULTS, **defaults})
    if args.cfg:
        merge_cfg(cfg, load_yaml(args.cfg), args.cfg)
    flags = {
        'GPU_ID': args.gpu,
        'SEED': args.seed,
        'OUT_DIR': args.out,
        'DETERMINISTIC': args.deterministic,
    }
    merge_cfg(cfg, {k: v for k, v in flags.items() if v is not None}, 'command line')
    apply_set(cfg, args.set)
    if not cfg.OUT_DIR:
        name = cfg.CONFIG_NAME or os.path.splitext(os.path.basename(args.cfg or 'run'))[0]
        cfg.OUT_DIR = os.path.join('output', name)
    return cfg


def flags_to_set(args, mapping):
    """Script flags that stand for cfg keys ({'batch_size': 'TRAIN.BATCH_SIZE'}, as DALLE-pytorch's
    CLI has them): each flag given (not None) becomes KEY=value ahead of --set, so a flag
    overrides the cfg file and an explicit --set overrides the flag."""
    given = [
        f"{key}={json.dumps(getattr(args, flag))}"
        for flag, key in mapping.items()
        if getattr(args, flag, None) is not None
    ]
    args.set = given + list(args.set or [])
    return args


def save_cfg(cfg, out_dir):
    atomic_write_text(
        os.path.join(out_dir, 'cfg.yml'), yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    )


# ----------------------------------------------------------------------------
# Device, seeding, distributed
# ----------------------------------------------------------------------------
def get_device(gpu):
    """gpu < 0: CPU. Under torchrun the local rank picks the GPU."""
    if gpu is None or gpu < 0:
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise UserError(
            f"GPU_ID={gpu} (--gpu or the cfg): CUDA was asked for but none is available "
            "(torch.cuda.is_available() is False); use --gpu -1 for the CPU"
        )
    n = torch.cuda.device_count()
    index = int(os.environ.get('LOCAL_RANK', gpu)) if is_distributed_env() else gpu
    if index >= n:
        raise UserError(
            f"GPU_ID={index} (--gpu, the cfg or LOCAL_RANK): only {n} CUDA device(s) visible"
        )
    torch.cuda.set_device(index)
    return torch.device('cuda', index)


def autocast(device, enabled, dtype=torch.bfloat16, cuda_only=False):
    """(torch.autocast context on `device` in `dtype` while `enabled`, GradScaler or None).
    float16 gets a GradScaler: its narrow exponent range needs loss scaling to keep small
    gradients (Micikevicius et al. 2018, Sec. 3.2); bfloat16 has float32's range and needs none.
    cuda_only: on any other device the context is off and training stays in float32."""
    on = enabled and (device.type == 'cuda' or not cuda_only)
    scaler = torch.amp.GradScaler('cuda') if on and dtype == torch.float16 else None
    return torch.autocast(device.type, dtype=dtype, enabled=on), scaler


def make_optimizer(params, lr):
    """train_vae.py's and train_dalle.py's Adam."""
    # Fused Adam: the same update as torch.optim.Adam, in one kernel over all tensors.
    return torch.optim.Adam(params, lr=lr, fused=True)


def memory_format(train_cfg, dev):
    """TRAIN.MEMORY_FORMAT as a torch memory format (auto: channels_last on CUDA or under AMP)."""
    choice = train_cfg.MEMORY_FORMAT
    if choice == 'auto':
        choice = 'channels_last' if dev.type == 'cuda' or train_cfg.AMP else 'contiguous'
    formats = {'channels_last': torch.channels_last, 'contiguous': torch.contiguous_format}
    if choice not in formats:
        raise UserError(
            f"TRAIN.MEMORY_FORMAT={choice!r}: expected auto, channels_last or contiguous"
        )
    return formats[choice]


def warn_slow_bf16(device, log):
    """bf16 autocast pays off on CUDA and on CPUs with AVX512-BF16 or AMX; elsewhere oneDNN
    emulates it, slower than fp32."""
    native = (
        getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)()
        or getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)()
    )
    if device.type == 'cpu' and not native:
        log.warning(
            "bf16 autocast on a CPU without AVX512-BF16/AMX is emulated and slower than fp32; "
            "set TRAIN.AMP=false"
        )


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def is_distributed_env():
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def init_distributed(device):
    """Start the process group when launched by torchrun; returns (rank, world)."""
    import torch.distributed as dist

    if not is_distributed_env():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), dist.get_world_size()


def cleanup_distributed():
    """Destroy the process group; True when there was one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def get_rank():
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main():
    return get_rank() == 0


def wrap_ddp(model, device, **kw):
    if get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == 'cuda' else None, **kw)


def unwrap(model):
    return model.module if hasattr(model, 'module') else model


def all_gather_with_grad(x):
    """Concatenate x from every rank; the local shard keeps its gradient, so a
    contrastive loss sees the global batch as negatives (open_clip's scheme)."""
    import torch.distributed as dist

    world = get_world_size()
    if world == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[get_rank()] = x
    return torch.cat(parts, 0)


def all_reduce_mean(value):
    """Average a python float / tensor over ranks (for logging)."""
    import torch.distributed as dist

    if get_world_size() == 1:
        return value
    t = torch.as_tensor(
        value, dtype=torch.float64, device='cuda' if dist.get_backend() == 'nccl' else 'cpu'
    )
    dist.all_reduce(t)
    return (t / get_world_size()).item()


def make_loader(dataset, batch_size, shuffle, drop_last=False, workers=0, seed=0, collate_fn=None):
    """A DataLoader that shards with DistributedSampler under torchrun."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = None
    if get_world_size() > 1:
        sampler = DistributedSampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=seed)
        shuffle = False
    g = torch.Generator()
    g.manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate_fn,
        generator=g,
        worker_init_fn=_seed_worker,
        pin_memory=torch.cuda.is_available(),
    )
    loader.base_seed = seed
    return loader


def _seed_worker(worker_id):
    # torch seeds each worker; numpy and random would otherwise repeat the same stream.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def set_epoch(loader, epoch):
    """Make the epoch's order (and worker seeds) a function of (seed, epoch) alone,
    so a run resumed at an epoch boundary sees the same batches as an uninterrupted one."""
    if hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(getattr(loader, 'base_seed', 0) * 100003 + epoch)


# ----------------------------------------------------------------------------
# Run setup, logging, progress, TensorBoard, metrics.json
# ----------------------------------------------------------------------------
class _NullWriter:
    def __getattr__(self, name):
        return lambda *a, **k: None


def get_logger(out_dir=None, name='t2i'):
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if not is_main():
        log.addHandler(logging.NullHandler())
        return log
    fmt = logging.Formatter('%(asctime)s %(message)s', '%Y-%m-%d %H:%M:%S')
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(fmt)
    log.addHandler(sh)
    if out_dir:
        fh = logging.FileHandler(os.path.join(out_dir, 'log.txt'))
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


class Run:
    """What a script gets from setup(): cfg, device, run dir, log, TensorBoard writer."""

    def __init__(self, cfg, device, rank, world, log, writer):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.out, self.log, self.writer = cfg.OUT_DIR, log, writer
        self.main = rank == 0


def make_run_dir(out_dir):
    """The run dir, created if missing; one line when it cannot hold a run."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(
            f"{out_dir}: exists and is not a directory (--out or OUT_DIR names the run dir)"
        )
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f'.write-test-{os.getpid()}')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise UserError(
            f"{out_dir}: cannot write the run dir there ({e.strerror or type(e).__name__})"
        )


def guard_run_dir(out_dir, args):
    """A run dir that holds training checkpoints belongs to that run: without --resume a new
    run would overwrite some of its files and leave its later checkpoints for a --resume auto
    to pick up. Refuse, unless --overwrite asks to clear it (checkpoints, TensorBoard, metrics)."""
    ckpt_dir = os.path.join(out_dir, 'checkpoints')
    held = (
        sorted(f for f in os.listdir(ckpt_dir) if f.endswith(('.pt', '.pth')))
        if os.path.isdir(ckpt_dir)
        else []
    )
    if not held or getattr(args, 'resume', None):
        return
    if not getattr(args, 'overwrite', False):
        raise UserError(
            f"{out_dir}: holds a run already ({len(held)} checkpoint(s), newest {held[-1]}); "
            "--resume auto continues it, --overwrite starts over, --out names another dir"
        )
    import shutil

    for name in ('checkpoints', 'tb'):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    for name in ('metrics.json', 'log.txt'):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def setup(args, defaults, tensorboard=True):
    """Parse cfg, choose the device, start DDP, seed, create the run dir and logs."""
    cfg = build_cfg(defaults, args)
    if not isinstance(cfg.CPU_THREADS, int) or cfg.CPU_THREADS < 0:
        raise UserError(f"CPU_THREADS={cfg.CPU_THREADS!r}: expected 0 (torch's default) or more")
    if cfg.CPU_THREADS:
        torch.set_num_threads(cfg.CPU_THREADS)
    device = get_device(cfg.GPU_ID)
    rank, world = init_distributed(device)
    seed_everything(cfg.SEED + rank, cfg.DETERMINISTIC)
    if rank == 0:
        make_run_dir(cfg.OUT_DIR)
        guard_run_dir(cfg.OUT_DIR, args)
        save_cfg(cfg, cfg.OUT_DIR)
    log = get_logger(cfg.OUT_DIR if rank == 0 else None)
    writer = _NullWriter()
    if tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(cfg.OUT_DIR, 'tb'))
        # its writing thread is a daemon: events not yet flushed (up to 2 minutes) die with it
        atexit.register(writer.close)
    log.info(
        f"run dir {cfg.OUT_DIR} | device {device} | world {world} | seed {cfg.SEED} | "
        f"CPU threads {torch.get_num_threads()}"
    )
    return Run(cfg, device, rank, world, log, writer)


def log_images(writer, tag, images, step, nrow=8):
    """images in [-1, 1], shape (N, 3, H, W): one grid in TensorBoard."""
    import torchvision.utils as vutils

    grid = vutils.make_grid(
        images.detach().float().cpu().clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1)
    )
    writer.add_image(tag, grid, step)


CURVE_COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


# what a generator's learning curve draws: R-precision, then the shapes judge's accuracies
CURVE_SCORES = (
    'r_precision',
    'judge_all',
    'judge_count',
    'judge_shape',
    'judge_colour',
    'judge_size',
    'judge_position',
)


def write_learning_curve(out, rows, title):
    """curve.json (the rows: one per checkpoint, with 'step', 'train_seconds' and its scores)
    and curve.png (the CURVE_SCORES every row has, against training seconds when every row
    has them, else against the step)."""
    atomic_write_text(os.path.join(out, 'curve.json'), json.dumps(rows, indent=1))
    names = [n for n in CURVE_SCORES if all(n in r for r in rows)]
    timed = all(r.get('train_seconds') is not None for r in rows)
    plot_curves(
        os.path.join(out, 'curve.png'),
        [r['train_seconds'] if timed else r['step'] for r in rows],
        {n: [r[n] for r in rows] for n in names},
        'training seconds' if timed else 'step',
        title,
    )


def plot_curves(path, xs, series, xlabel, title, ymax=1.0):
    """A line plot as a PNG (PIL only): one line per name in `series` ({name: [y per x]}),
    y from 0 to ymax, with a legend; for learning curves of scores in [0, 1]."""
    from PIL import Image, ImageDraw

    W, H, left, right, top, bottom = 640, 400, 50, 150, 30, 40
    img = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(img)
    x0, x1 = min(xs), max(max(xs), min(xs) + 1e-9)

    def px(x):
        return left + (x - x0) / (x1 - x0) * (W - left - right)

    def py(y):
        return H - bottom - min(max(y, 0), ymax) / ymax * (H - top - bottom)

    d.rectangle([left, top, W - right, H - bottom], outline='black')
    for i in range(6):
        y = ymax * i / 5
        d.line([left, py(y), W - right, py(y)], fill=(225, 225, 225))
        d.text((8, py(y) - 6), f'{y:.1f}', fill='black')
    for x in (x0, (x0 + x1) / 2, x1):
        d.text((px(x) - 12, H - bottom + 6), f'{x:.0f}', fill='black')
    d.text((left + (W - left - right) // 2 - 40, H - 18), xlabel, fill='black')
    d.text((left, 8), title, fill='black')
    for k, (name, ys) in enumerate(series.items()):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        d.line(
            [W - right + 10, top + 10 + 16 * k, W - right + 30, top + 10 + 16 * k],
            fill=colour,
            width=3,
        )
        d.text((W - right + 36, top + 4 + 16 * k), name, fill='black')
    img.save(path)


def save_image_grid(images, path, nrow=8):
    import torchvision.utils as vutils

    vutils.save_image(
        images.detach().float().cpu().clamp(-1, 1),
        path,
        nrow=nrow,
        normalize=True,
        value_range=(-1, 1),
    )


class progress:
    """tqdm on a terminal; on a pipe or nohup log, one plain line every
    `every` steps (and at the end) instead of carriage-return spam."""

    def __init__(self, iterable=None, total=None, desc='', every=50, disable=None, log=None):
        self.iterable, self.desc, self.every = iterable, desc, max(1, every)
        self.total = (
            total
            if total is not None
            else (len(iterable) if hasattr(iterable, '__len__') else None)
        )
        self.disable = (not is_main()) if disable is None else disable
        self.tty = sys.stderr.isatty()
        self.log, self.n, self.postfix, self.t0 = log, 0, {}, time.time()
        self._bar = None
        if self.tty and not self.disable:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, dynamic_ncols=True)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def set_postfix(self, **kw):
        self.postfix = {k: (f'{v:.4g}' if isinstance(v, float) else v) for k, v in kw.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def update(self, n=1):
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.disable and (self.n % self.every == 0 or self.n == self.total):
            self._line()

    def _line(self):
        dt = time.time() - self.t0
        rate = self.n / dt if dt > 0 else 0.0
        tot = f'/{self.total}' if self.total else ''
        post = ' '.join(f'{k}={v}' for k, v in self.postfix.items())
        msg = f'{self.desc} {self.n}{tot} [{dt:.0f}s, {rate:.2f} it/s] {post}'.strip()
        (self.log.info if self.log else print)(msg)
        sys.stdout.flush()

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def write_metrics(out_dir, metrics, name='metrics.json'):
    """Final numbers of a run, merged into <run dir>/metrics.json (atomic)."""
    if not is_main():
        return
    path = os.path.join(out_dir, name)
    data = {}
    if os.path.isfile(path):
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError:
                data = {}
    data.update(metrics)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def check_finite(loss, name, step):
    """A NaN/inf loss stops the run before anything is saved over a good checkpoint."""
    if not torch.isfinite(loss).all():
        raise UserError(
            f"loss '{name}' is {loss.item()} at step {step}; stopping without "
            "saving (lower the learning rate or try --set ...AMP=false)"
        )


# ----------------------------------------------------------------------------
# Checkpoints: atomic writes, keep the last K, resume, kind checks
# ----------------------------------------------------------------------------
def _fsync_dir(d):
    try:
        fd = os.open(d, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def atomic_write_bytes(path, data):
    """Write to a temporary file beside `path`, then rename it over `path`: a reader sees the
    old file or the new one, never a part. A failed write (disk full, read-only folder) leaves
    the old file and no temporary one, and stops with one line naming the path."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(d, exist_ok=True)
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(
            f"{path}: cannot write ({e.strerror or e}); nothing was overwritten"
        ) from None
    _fsync_dir(d)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_torch_save(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def rng_state():
    np_state = np.random.get_state()
    st = {
        'python': random.getstate(),
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st['cuda'] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    random.setstate(tuple(st['python'][:1]) + (tuple(st['python'][1]),) + tuple(st['python'][2:]))
    n = st['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(st['torch'])
    if 'cuda' in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st['cuda'])


def save_checkpoint(
    out_dir,
    kind,
    step,
    models,
    optimizers=None,
    schedulers=None,
    scaler=None,
    epoch=0,
    cfg=None,
    extra=None,
    keep=3,
    name=None,
):
    """Save the full training state atomically as <out>/checkpoints/<kind>_<step>.pt
    and delete all but the newest `keep` of this kind. Only rank 0 writes."""
    if not is_main():
        return None
    ckpt = {
        'kind': kind,
        'format': 1,
        'step': int(step),
        'epoch': int(epoch),
        'models': {k: unwrap(m).state_dict() for k, m in models.items()},
        'optimizers': {k: o.state_dict() for k, o in (optimizers or {}).items()},
        'schedulers': {k: s.state_dict() for k, s in (schedulers or {}).items()},
        'scaler': scaler.state_dict() if scaler is not None else None,
        'rng': rng_state(),
        'cfg': cfg.to_dict() if isinstance(cfg, Cfg) else cfg,
        'extra': extra or {},
    }
    d = os.path.join(out_dir, 'checkpoints')
    path = os.path.join(d, name or f'{kind}_{step:08d}.pt')
    atomic_torch_save(ckpt, path)
    if keep and keep > 0:
        for old in list_checkpoints(out_dir, kind)[:-keep]:
            os.remove(old)
    return path


def list_checkpoints(out_dir, kind):
    """This kind's step checkpoints in the run dir, oldest first."""
    d = os.path.join(out_dir, 'checkpoints')
    if not os.path.isdir(d):
        return []
    pat = re.compile(rf'^{re.escape(kind)}_(\d+)\.pt$')
    found = [(int(m.group(1)), os.path.join(d, f)) for f in os.listdir(d) if (m := pat.match(f))]
    return [p for _, p in sorted(found)]


def load_weights(path, map_location='cpu'):
    """torch.load(weights_only=True) of a .pt/.pth file, or one line naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]})"
        )


def is_state_dict(obj):
    """A plain torch.save(net.state_dict()), as the original repositories release their weights."""
    return (
        isinstance(obj, dict)
        and bool(obj)
        and 'kind' not in obj
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    )


def load_checkpoint(path, kind=None, map_location='cpu'):
    """torch.load(weights_only=True) and check the checkpoint is of the expected kind."""
    return checkpoint_of_kind(load_weights(path, map_location), path, kind)


def checkpoint_of_kind(ckpt, path, kind=None):
    """`ckpt` (read from `path`) if it is one of our training checkpoints of `kind`, else one line."""
    if not isinstance(ckpt, dict) or 'kind' not in ckpt:
        raise UserError(f"{path}: not a t2i-repro training checkpoint (no 'kind' entry)")
    if kind is not None and ckpt['kind'] != kind:
        raise UserError(f"{path}: checkpoint of kind '{ckpt['kind']}', expected '{kind}'")
    return ckpt


def _is_lr_key(key):
    leaf = key.split('.')[-1]
    return leaf in ('LR', 'LEARNING_RATE') or leaf.endswith('_LR')


def report_resume_differences(ckpt, cfg, log):
    """Say what resuming keeps from the checkpoint although the cfg now says otherwise: its
    optimizers' learning rates (a warning, one per key), and every other cfg value that
    differs from the resumed run's (one line)."""
    saved = ckpt.get('cfg')
    if not isinstance(saved, dict) or cfg is None or log is None:
        return

    def flat(d, prefix=''):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
        return out

    old, new = flat(saved), flat(cfg.to_dict() if isinstance(cfg, Cfg) else cfg)
    diff = [k for k in new if k in old and old[k] != new[k] and k not in ('OUT_DIR', 'GPU_ID')]
    for k in diff:
        if _is_lr_key(k):
            log.warning(
                f"{k}={new[k]} is not used: resuming keeps the checkpoint's optimizer state "
                f"(lr {old[k]}); start a new run dir for a new learning rate"
            )
    others = [f"{k} ({old[k]!r} -> {new[k]!r})" for k in diff if not _is_lr_key(k)]
    if others:
        log.info(
            "cfg values that differ from the resumed run's (these take effect): "
            + ', '.join(others)
        )


def read_resume(resume, run, kind, is_foreign):
    """--resume -> (our checkpoint of `kind`, None), (None, a file of the original's layout
    that `is_foreign` recognises, as read) or (None, None) when there is nothing to resume."""
    if resume and resume != 'auto':
        obj = load_weights(resume)
        if is_foreign(obj):
            return None, obj
        ckpt = checkpoint_of_kind(obj, resume, kind)
        report_resume_differences(ckpt, run.cfg, run.log)
        return ckpt, None
    return resolve_resume(resume, run.out, kind, run.log, run.cfg), None


def resolve_resume(resume, out_dir, kind, log=None, cfg=None):
    """--resume auto: newest loadable checkpoint of `kind` in the run dir (None if
    there is none); --resume PATH: that file. Returns the loaded checkpoint or None;
    with `cfg`, reports what the checkpoint keeps that the cfg now changes."""
    if not resume:
        return None
    if resume != 'auto':
        ckpt = load_checkpoint(resume, kind)
        report_resume_differences(ckpt, cfg, log)
        return ckpt
    for path in reversed(list_checkpoints(out_dir, kind)):
        try:
            ckpt = load_checkpoint(path, kind)
        except UserError as e:
            if log:
                log.warning(f"skipping unreadable checkpoint: {e}")
            continue
        if log:
            log.info(f"resuming from {path} (step {ckpt['step']})")
        report_resume_differences(ckpt, cfg, log)
        return ckpt
    if log:
        log.info(f"--resume auto: no {kind} checkpoint in {out_dir}; starting fresh")
    return None


def restore_checkpoint(ckpt, models, optimizers=None, schedulers=None, scaler=None, rng=True):
    """Load every piece of state saved by save_checkpoint back into live objects."""
    for k, m in models.items():
        if k not in ckpt['models']:
            raise UserError(f"checkpoint has no model '{k}' (has {sorted(ckpt['models'])})")
        try:
            unwrap(m).load_state_dict(ckpt['models'][k])
        except RuntimeError as e:  # the cfg changed the architecture since the checkpoint
            detail = ' '.join(str(e).split('\n', 1)[-1].split())[:240]
            raise UserError(
                f"checkpoint's '{k}' does not fit the model the cfg builds ({detail}); "
                "resume with the run's own cfg (its cfg.yml), or start a new run dir"
            )
    for k, o in (optimizers or {}).items():
        o.load_state_dict(ckpt['optimizers'][k])
    for k, s in (schedulers or {}).items():
        s.load_state_dict(ckpt['schedulers'][k])
    if scaler is not None and ckpt.get('scaler') is not None:
        scaler.load_state_dict(ckpt['scaler'])
    if rng:
        set_rng_state(ckpt['rng'])
    return ckpt['step'], ckpt['epoch']


# ----------------------------------------------------------------------------
# Restricted unpickler for dataset pickles (AttnGAN's filenames/captions/class_info)
# ----------------------------------------------------------------------------
_SAFE_GLOBALS = {
    ('builtins', n)
    for n in (
        'list',
        'dict',
        'tuple',
        'set',
        'frozenset',
        'int',
        'float',
        'str',
        'bytes',
        'bool',
        'complex',
    )
}
_SAFE_GLOBALS.add(('collections', 'OrderedDict'))


def _numeric_dtype(dt):
    """np.dtype of a plain integer or float kind, else UnpicklingError."""
    import numpy as np

    dt = np.dtype(dt)
    if dt.kind not in 'iuf' or dt.fields is not None or dt.subdtype is not None:
        raise pickle.UnpicklingError(f"refusing numpy dtype {dt!r} (only integer and float kinds)")
    return dt


def _np_dtype(name, align=False, copy=False):
    """numpy.dtype as pickles reconstruct it (AttnGAN's class_info.pickle: dtype('i8'))."""
    if not isinstance(name, str):
        raise pickle.UnpicklingError(f"refusing numpy dtype from {type(name).__name__}")
    return _numeric_dtype(name)


def _np_scalar(dtype, data):
    """numpy.core.multiarray.scalar(dtype, raw bytes): an integer/float numpy scalar."""
    import numpy as np

    dt = _numeric_dtype(dtype)
    if isinstance(data, str):  # Python 2 pickles read with latin-1
        data = data.encode('latin1')
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of {dt}: expected {dt.itemsize} raw bytes")
    return np.frombuffer(data, dt)[0]


# numpy >= 2 pickles name the module numpy._core; older ones numpy.core.
_NUMPY_GLOBALS = {
    ('numpy', 'dtype'): _np_dtype,
    ('numpy.core.multiarray', 'scalar'): _np_scalar,
    ('numpy._core.multiarray', 'scalar'): _np_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Plain containers and numbers (_SAFE_GLOBALS), plus the stand-ins of `extra`
    ({(module, name): callable}); any other global is refused before it is looked up."""

    def __init__(self, file, extra, **kwargs):
        super().__init__(file, **kwargs)
        self.extra = extra

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if (module, name) in self.extra:
            return self.extra[module, name]
        raise pickle.UnpicklingError(f"refusing global '{module}.{name}'")


def safe_pickle_load(path):
    """Load a dataset pickle allowing only plain containers, strings, numbers and numpy
    integer/float scalars. Python 2 pickles (AttnGAN's) decode byte strings as latin-1.
    Protocol-0 pickles that went through a CRLF checkout are read as the original: every
    '\\r\\n' is a '\\n' there (protocol 0 escapes control characters inside strings)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    with open(path, 'rb') as f:
        data = f.read()
    crlf = not data.startswith(b'\x80') and b'\r\n' in data
    if crlf:
        data = data.replace(b'\r\n', b'\n')
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), _NUMPY_GLOBALS, encoding='latin1').load()
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path}: unsafe or corrupt pickle ({e}); only plain "
            "lists/dicts/strings/numbers are accepted"
        )
    except Exception as e:
        raise UserError(f"{path}: unreadable pickle ({type(e).__name__}: {e})")
    return obj


def safe_pickle_dump(obj, path):
    atomic_write_bytes(path, pickle.dumps(obj, protocol=2))


# ----------------------------------------------------------------------------
# Restricted reader for pickled .npy files (XMC-GAN's resnet_pretrained.npy, which the original
# reads with np.load(allow_pickle=True).item(): xmcgan/utils/pretrained_model_utils.py)
# ----------------------------------------------------------------------------
# The pickle's numpy globals become stand-ins that only record their arguments; the arrays are
# built afterwards from checked dtypes and raw bytes, so no numpy __setstate__ (nor anything
# else the pickle names) runs on what the file says.
class _NpyDtype:
    """numpy.dtype(name, align, copy) and its pickled state: a numeric or object dtype."""

    def __init__(self, name, align=False, copy=False):
        if not isinstance(name, str):
            raise pickle.UnpicklingError(f"refusing numpy dtype from {type(name).__name__}")
        dt = np.dtype(name)
        self.dtype = dt if dt == np.dtype(object) else _numeric_dtype(dt)

    def __setstate__(self, state):
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata]):
        # only the byte order is taken; a structured or subarray dtype is refused.
        if not (
            isinstance(state, tuple)
            and len(state) in (8, 9)
            and state[1] in ('<', '>', '|', '=')
            and state[2:5] == (None, None, None)
        ):
            raise pickle.UnpicklingError(f"refusing numpy dtype state {str(state)[:80]}")
        if state[1] in '<>':
            self.dtype = self.dtype.newbyteorder(state[1])


class _NpyNdarray:
    """numpy.ndarray, accepted only as the class argument of _reconstruct."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("refusing a call of numpy.ndarray")


class _NpyArray:
    """numpy's _reconstruct(ndarray, shape, typecode) and its state (version, shape, dtype,
    Fortran order, raw bytes; a list of objects for an object array); `build` makes the array."""

    def __init__(self, cls, shape, typecode):
        if cls is not _NpyNdarray:
            raise pickle.UnpicklingError(
                f"refusing _reconstruct of {getattr(cls, '__name__', cls)}"
            )
        self.state = None

    def __setstate__(self, state):
        if not (
            isinstance(state, tuple)
            and len(state) == 5
            and isinstance(state[1], tuple)
            and all(isinstance(n, int) and n >= 0 for n in state[1])
            and isinstance(state[2], _NpyDtype)
        ):
            raise pickle.UnpicklingError(
                "numpy array state is not (version, shape, dtype, order, data)"
            )
        self.state = state

    def build(self, resolve):
        if self.state is None:
            raise pickle.UnpicklingError("numpy array without its state")
        _, shape, dt, fortran, data = self.state
        dt, order, n = dt.dtype, 'F' if fortran else 'C', math.prod(shape)
        if dt == np.dtype(object):
            if not isinstance(data, list) or len(data) != n:
                raise pickle.UnpicklingError(
                    f"object array of shape {shape}: expected a list of {n} items"
                )
            out = np.empty(n, object)
            for i, v in enumerate(data):
                out[i] = resolve(v)
            return out.reshape(shape, order=order)
        if not isinstance(data, bytes) or len(data) != n * dt.itemsize:
            raise pickle.UnpicklingError(
                f"{dt} array of shape {shape}: expected {n * dt.itemsize} raw bytes"
            )
        return np.frombuffer(data, dt).reshape(shape, order=order).astype(dt.newbyteorder('='))


class _FrozenDict(dict):
    """flax.core.frozen_dict.FrozenDict read as a dict. flax pickles it as FrozenDict(<dict>) (its
    __reduce__); a default pickle of its __slots__ ('_dict', '_hash') carries {'_dict': <dict>}."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
            state = state[1]  # (no __dict__, the slots' values)
        if not (isinstance(state, dict) and isinstance(state.get('_dict'), dict)):
            raise pickle.UnpicklingError("FrozenDict state without its '_dict'")
        self.update(state['_dict'])


def _npy_scalar(dtype, data):
    if not isinstance(dtype, _NpyDtype):
        raise pickle.UnpicklingError("numpy scalar without a numpy dtype")
    return _np_scalar(dtype.dtype, data)


_NPY_GLOBALS = {
    ('numpy', 'dtype'): _NpyDtype,
    ('numpy', 'ndarray'): _NpyNdarray,
    ('flax.core.frozen_dict', 'FrozenDict'): _FrozenDict,
}
for _m in ('numpy.core.multiarray', 'numpy._core.multiarray'):  # numpy < 2 and >= 2 names
    _NPY_GLOBALS[_m, '_reconstruct'] = _NpyArray
    _NPY_GLOBALS[_m, 'scalar'] = _npy_scalar


def _npy_resolve(x):
    """The unpickled object with its stand-ins replaced: arrays built, FrozenDicts as dicts."""
    if isinstance(x, _NpyArray):
        return x.build(_npy_resolve)
    if isinstance(x, dict):
        return (dict if isinstance(x, _FrozenDict) else type(x))(
            (k, _npy_resolve(v)) for k, v in x.items()
        )
    if isinstance(x, (list, tuple)):
        return type(x)(_npy_resolve(v) for v in x)
    return x


def safe_npy_load(path):
    """np.load(path, allow_pickle=True) of an object array (np.save of a pickled object) without
    running the pickle: the payload may hold only numpy arrays of integer/float/object dtypes, numpy
    scalars, plain containers and flax FrozenDicts (read as dicts); anything else is refused."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    fmt = np.lib.format
    with open(path, 'rb') as f:
        try:
            version = fmt.read_magic(f)
            read_header = {
                (1, 0): fmt.read_array_header_1_0,
                (2, 0): fmt.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
            _, _, dtype = read_header(f)
        except ValueError as e:
            raise UserError(f"{path}: not a readable .npy file ({str(e).splitlines()[0][:200]})")
        if dtype != np.dtype(object):
            raise UserError(f"{path}: a plain {dtype} array, not a pickled object array")
        data = f.read()
    try:
        arr = _npy_resolve(_RestrictedUnpickler(io.BytesIO(data), _NPY_GLOBALS).load())
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path}: unsafe or corrupt pickle in the .npy file ({e}); only numpy arrays, "
            "plain containers and flax FrozenDicts are accepted"
        )
    except Exception as e:
        raise UserError(f"{path}: unreadable pickle in the .npy file ({type(e).__name__}: {e})")
    if not isinstance(arr, np.ndarray):
        raise UserError(f"{path}: the .npy pickle holds a {type(arr).__name__}, not an array")
    return arr


# ----------------------------------------------------------------------------
# Data: images, the AttnGAN/DM-GAN layout (CUB, COCO), COCO json, CSV, jsonl, folders
# ----------------------------------------------------------------------------
IMG_EXTENSIONS = ('.bmp', '.jpg', '.jpeg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')


class BadImage(UserError):
    pass


def load_image(path):
    """An RGB PIL image, or BadImage naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert('RGB')
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"{path}: unreadable image ({type(e).__name__}: {e})")


def list_images(folder, recursive=True):
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: image folder not found")
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMG_EXTENSIONS)]
        if not recursive:
            break
    return sorted(out)


TOKENIZER_FILES = {
    'clip': "a folder with CLIP's vocab.json + merges.txt (open_clip's package ships the BPE as "
    "bpe_simple_vocab_16e6.txt.gz)",
    'bert': "a vocab.txt (the Chinese one: cn_clip/clip/vocab.txt of the cn-clip package, 21,128 "
    "entries) or a folder holding one",
}


def check_real_vocabulary(tok, source, kind):
    """A transformers tokenizer whose files could not be had (a hub name offline) comes back
    holding only its special tokens; training on it reads every caption as [UNK]. Refuse it."""
    vocab = tok.get_vocab()
    if set(vocab) <= set(tok.all_special_tokens):
        raise UserError(
            f"{source}: the tokenizer holds only its {len(vocab)} special tokens (its vocabulary "
            f"files were not found, nothing is downloaded here); give {TOKENIZER_FILES[kind]}"
        )
    return tok


def load_hf_tokenizer(scheme, path, source):
    """A named transformers tokenizer: 'clip' (CLIP's BPE: a hub name or a folder with
    vocab.json + merges.txt) or 'bert' (WordPiece: a vocab.txt, a folder holding one, or a hub
    name), with its real vocabulary; anything else is one line naming `source`."""
    import transformers

    try:
        if scheme == 'clip':
            tok = transformers.CLIPTokenizer.from_pretrained(path)
        elif os.path.isfile(path):  # transformers 5 names the argument `vocab`, 4 `vocab_file`
            v5 = 'vocab' in inspect.signature(transformers.BertTokenizer.__init__).parameters
            tok = transformers.BertTokenizer(**{'vocab' if v5 else 'vocab_file': path})
        else:
            tok = transformers.BertTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{source}: cannot load the {scheme} tokenizer offline ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); give {TOKENIZER_FILES[scheme]} (no downloads here)"
        )
    return check_real_vocabulary(tok, source, scheme)


def tokenize_attngan(text):
    """AttnGAN's tokenisation: lowercase, RegexpTokenizer(r'\\w+'), ASCII only."""
    text = text.replace('\ufffd\ufffd', ' ').lower()
    return [
        t.encode('ascii', 'ignore').decode('ascii')
        for t in re.findall(r'\w+', text)
        if t.encode('ascii', 'ignore')
    ]


def _require(path, what):
    if not os.path.exists(path):
        raise UserError(f"{path}: missing ({what})")
    return path


def _read_captions_txt(path, n):
    """The first n non-empty captions of text/<key>.txt."""
    _require(path, f'caption file with {n} lines')
    with open(path, encoding='utf-8', errors='replace') as f:
        caps = [line.strip() for line in f if line.strip()]
    if len(caps) < n:
        raise UserError(f"{path}: has {len(caps)} captions, CAPTIONS_PER_IMAGE expects {n}")
    return caps[:n]


def read_attngan_split(data_dir, split):
    """Keys of a split from <data_dir>/<split>/filenames.pickle."""
    path = _require(
        os.path.join(data_dir, split, 'filenames.pickle'),
        f"AttnGAN layout: list of image keys for the '{split}' split",
    )
    keys = safe_pickle_load(path)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise UserError(f"{path}: expected a list of image keys (str)")
    return keys


def build_vocab(tokenized_captions):
    """AttnGAN's vocabulary: index 0 is '<end>' (padding), then words in first-seen order."""
    ixtoword, wordtoix = {0: '<end>'}, {'<end>': 0}
    for cap in tokenized_captions:
        for w in cap:
            if w not in wordtoix:
                wordtoix[w] = len(ixtoword)
                ixtoword[len(ixtoword)] = w
    return ixtoword, wordtoix


class AttnGANData:
    """The AttnGAN/DM-GAN on-disk layout for birds (CUB-200-2011) and COCO:

        <data_dir>/{train,test}/filenames.pickle   image keys
        <data_dir>/{train,test}/class_info.pickle  class id per key (optional)
        <data_dir>/text/<key>.txt                  CAPTIONS_PER_IMAGE lines
        <data_dir>/captions.pickle                 [train_ids, test_ids, ixtoword, wordtoix]
        birds: <data_dir>/CUB_200_2011/{images/<key>.jpg, images.txt, bounding_boxes.txt}
        coco:  <data_dir>/images/<key>.jpg

    captions.pickle is built (and written) from the text files when absent, as AttnGAN does.
    """

    def __init__(self, data_dir, captions_per_image):
        if not os.path.isdir(data_dir):
            raise UserError(
                f"{data_dir}: data directory not found (expected the AttnGAN "
                "layout: train/ test/ text/ and images)"
            )
        self.data_dir, self.n_caps = data_dir, captions_per_image
        self.is_birds = os.path.isdir(os.path.join(data_dir, 'CUB_200_2011'))
        self.image_dir = (
            os.path.join(data_dir, 'CUB_200_2011', 'images')
            if self.is_birds
            else os.path.join(data_dir, 'images')
        )
        _require(self.image_dir, 'image folder')
        self.keys = {s: read_attngan_split(data_dir, s) for s in ('train', 'test')}
        self.bbox = self._load_bbox() if self.is_birds else {}
        cap_path = os.path.join(data_dir, 'captions.pickle')
        if os.path.isfile(cap_path):
            x = safe_pickle_load(cap_path)
            if not (isinstance(x, list) and len(x) == 4):
                raise UserError(f"{cap_path}: expected [train_ids, test_ids, ixtoword, wordtoix]")
            self.ids = {'train': x[0], 'test': x[1]}
            self.ixtoword, self.wordtoix = x[2], x[3]
        else:
            toks = {
                s: [tokenize_attngan(c) for k in self.keys[s] for c in self.raw_captions(k)]
                for s in ('train', 'test')
            }
            self.ixtoword, self.wordtoix = build_vocab(toks['train'] + toks['test'])
            self.ids = {s: [[self.wordtoix[w] for w in c] for c in toks[s]] for s in toks}
            safe_pickle_dump(
                [self.ids['train'], self.ids['test'], self.ixtoword, self.wordtoix], cap_path
            )
        for s in ('train', 'test'):
            if len(self.ids[s]) != len(self.keys[s]) * self.n_caps:
                raise UserError(
                    f"{cap_path}: {len(self.ids[s])} {s} captions for "
                    f"{len(self.keys[s])} images x {self.n_caps} captions; "
                    "CAPTIONS_PER_IMAGE does not match this dataset"
                )

    def _load_bbox(self):
        root = os.path.join(self.data_dir, 'CUB_200_2011')
        names = {}
        with open(_require(os.path.join(root, 'images.txt'), 'CUB "<id> <path>" list')) as f:
            for line in f:
                if line.strip():
                    i, p = line.split()
                    names[i] = p[:-4]
        bbox = {}
        with open(
            _require(os.path.join(root, 'bounding_boxes.txt'), 'CUB "<id> x y w h" list')
        ) as f:
            for line in f:
                if line.strip():
                    i, *box = line.split()
                    bbox[names[i]] = [float(v) for v in box]
        return bbox

    def raw_captions(self, key):
        return _read_captions_txt(os.path.join(self.data_dir, 'text', key + '.txt'), self.n_caps)

    def class_ids(self, split):
        path = os.path.join(self.data_dir, split, 'class_info.pickle')
        if os.path.isfile(path):
            ids = safe_pickle_load(path)
            if len(ids) != len(self.keys[split]):
                raise UserError(f"{path}: {len(ids)} class ids for {len(self.keys[split])} images")
            return [int(c) for c in ids]
        return list(range(len(self.keys[split])))  # AttnGAN: no file -> every image its own class

    def image_path(self, key):
        return os.path.join(self.image_dir, key + '.jpg')


def crop_to_bbox(img, bbox):
    """AttnGAN's bird crop: a square of half-side 0.75 * max(w, h) around the box centre."""
    width, height = img.size
    r = int(max(bbox[2], bbox[3]) * 0.75)
    cx, cy = int((2 * bbox[0] + bbox[2]) / 2), int((2 * bbox[1] + bbox[3]) / 2)
    y1, y2 = max(0, cy - r), min(height, cy + r)
    x1, x2 = max(0, cx - r), min(width, cx + r)
    return img.crop([x1, y1, x2, y2])


def skip_unreadable(dataset, index, read):
    """(index, read(index)) for the first readable item from `index` on, wrapping around: an
    unreadable file is warned about once (dataset.bad, per worker) and skipped; a dataset with no
    readable item at all stops the run."""
    for step in range(len(dataset)):
        i = (index + step) % len(dataset)
        if i in dataset.bad:
            continue
        try:
            return i, read(i)
        except BadImage as e:
            dataset.bad.add(i)
            logging.getLogger('t2i').warning(
                f"skipping {e} ({len(dataset.bad)} unreadable so far in this worker)"
            )
    raise UserError(
        f"no readable image among the {len(dataset)} items of the dataset (see the warnings above)"
    )


class TextImageDataset(torch.utils.data.Dataset):
    """AttnGAN/DM-GAN TextDataset: one random caption of an image (two with
    `two_captions`, for the contrastive variants) and the image pyramid
    base_size * 2**i, i < branch_num, in [-1, 1]."""

    def __init__(
        self,
        data,
        split,
        base_size=64,
        branch_num=3,
        words_num=18,
        train=True,
        two_captions=False,
        image_size=None,
        flip=True,
        crop=True,
        preload=False,
    ):
        import torchvision.transforms as T

        self.d, self.split, self.words_num, self.train = data, split, words_num, train
        self.keys, self.ids = data.keys[split], data.ids[split]
        self.class_ids = data.class_ids(split)
        self.two = two_captions
        self.sizes = (
            [base_size * 2**i for i in range(branch_num)] if image_size is None else [image_size]
        )
        top = self.sizes[-1]
        # AttnGAN: resize to 76/64 of the size, then a random (train) or central (test) crop, and
        # random flips in training; crop=False / flip=False for data whose captions name positions.
        first = (
            [T.Resize(int(top * 76 / 64)), T.RandomCrop(top) if train else T.CenterCrop(top)]
            if crop
            else [T.Resize([top, top])]
        )
        self.aug = T.Compose(first + ([T.RandomHorizontalFlip()] if train and flip else []))
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
        self.bad = set()  # indices of unreadable files (skip_unreadable)
        self.cache = None
        if preload:  # decode every image once; only a deterministic transform can be cached
            if train and (crop or flip):
                raise UserError(
                    "DATA.PRELOAD needs DATA.CROP and DATA.FLIP false (random crops and flips "
                    "are drawn per step)"
                )
            self.cache = [self._decode(k) for k in self.keys]

    def _decode(self, key):
        """The pyramid of one image as uint8 tensors (what images() returns, before scaling)."""
        try:
            return [(x * 127.5 + 127.5).round().to(torch.uint8) for x in self.images(key)]
        except BadImage as e:
            logging.getLogger('t2i').warning(f"skipping {e}")
            return None

    def __len__(self):
        return len(self.keys)

    def caption(self, index):
        """Padded word ids (0 = <end>) and length; long captions keep a random
        order-preserving subset of words_num words, as AttnGAN does."""
        sent = [w for w in self.ids[index] if w != 0]
        x = np.zeros(self.words_num, dtype=np.int64)
        n = len(sent)
        if n <= self.words_num:
            x[:n] = sent
        else:
            keep = np.sort(np.random.permutation(n)[: self.words_num])
            x[:] = np.asarray(sent)[keep]
            n = self.words_num
        return torch.from_numpy(x), max(n, 1)

    def images(self, key, index=None):
        import torchvision.transforms.functional as TF

        if self.cache is not None and index is not None:
            if self.cache[index] is None:
                raise BadImage(f"{self.d.image_path(key)}: unreadable image (when preloaded)")
            return [x.float() / 127.5 - 1 for x in self.cache[index]]
        img = load_image(self.d.image_path(key))
        if key in self.d.bbox:
            img = crop_to_bbox(img, self.d.bbox[key])
        img = self.aug(img)
        out = []
        for s in self.sizes:
            im = img if s == img.size[0] else TF.resize(img, [s, s])
            out.append(self.to_tensor(im))
        return out

    def __getitem__(self, index):
        index, imgs = skip_unreadable(self, index, lambda i: self.images(self.keys[i], i))
        key = self.keys[index]
        n = self.d.n_caps
        picks = (
            np.random.choice(n, 2, replace=False)
            if self.two and n > 1
            else [np.random.randint(n)] * (2 if self.two else 1)
        )
        item = {'imgs': imgs, 'class_id': self.class_ids[index], 'key': key, 'index': index}
        texts = self.d.raw_captions(key)
        for j, p in enumerate(picks):
            cap, n_words = self.caption(index * n + p)
            sfx = '' if j == 0 else str(j + 1)
            item['caption' + sfx], item['cap_len' + sfx], item['text' + sfx] = (
                cap,
                n_words,
                texts[p],
            )
        return item


def read_coco_json(json_path, image_dir):
    """COCO-2014 official captions json -> [(image path, [captions...])], by image id."""
    _require(json_path, 'COCO captions json (annotations/captions_<split>2014.json)')
    with open(json_path) as f:
        try:
            js = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{json_path}: not valid JSON ({e})")
    if 'images' not in js or 'annotations' not in js:
        raise UserError(f"{json_path}: expected keys 'images' and 'annotations'")
    caps = collections.defaultdict(list)
    for a in js['annotations']:
        caps[a['image_id']].append(a['caption'].strip())
    return [
        (os.path.join(image_dir, im['file_name']), caps[im['id']])
        for im in sorted(js['images'], key=lambda im: im['id'])
        if caps[im['id']]
    ]


def _resolve(path, base_dir):
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def read_csv_pairs(path, img_key='filepath', caption_key='title', sep='\t'):
    """open_clip's CSV (--csv-img-key/--csv-caption-key, tab-separated by default).
    A relative image path is read from the working directory as open_clip reads it, else from
    the CSV file's folder."""
    _require(path, 'CSV of image paths and captions')
    with open(path, newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f, delimiter=sep)
        for key in (img_key, caption_key):
            if key not in (reader.fieldnames or []):
                raise UserError(
                    f"{path}: no column '{key}' (columns: {reader.fieldnames}; separator {sep!r})"
                )
        base, out = os.path.dirname(os.path.abspath(path)), []
        for n, r in enumerate(reader, 2):
            if not r[caption_key] or not r[img_key]:
                raise UserError(
                    f"{path}:{n}: a row without {'a caption' if r[img_key] else 'an image path'} "
                    f"(columns '{img_key}' and '{caption_key}', separator {sep!r})"
                )
            img = r[img_key]  # open_clip opens a relative path from the working directory
            out.append(
                (
                    os.path.abspath(img)
                    if not os.path.isabs(img) and os.path.exists(img)
                    else _resolve(img, base),
                    r[caption_key],
                )
            )
        return out


def read_jsonl_pairs(path):
    """BriVL-Generation's DALLE data: lines {"image_path": ..., "sentences": ...}."""
    _require(path, 'jsonl with image_path/sentences lines')
    base, out = os.path.dirname(os.path.abspath(path)), []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                out.append((_resolve(r['image_path'], base), r['sentences']))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(
                    f"{path}:{n}: expected {{\"image_path\": ..., \"sentences\": ...}} "
                    f"({type(e).__name__})"
                )
    return out


def read_folder_pairs(folder):
    """DALLE-pytorch's folder format: an image and a same-stem .txt (one caption a
    line) anywhere below `folder`."""
    pairs = []
    for img in list_images(folder):
        txt = os.path.splitext(img)[0] + '.txt'
        if os.path.isfile(txt):
            with open(txt, encoding='utf-8') as f:
                caps = [line.strip() for line in f if line.strip()]
            if caps:
                pairs.append((img, caps))
    if not pairs:
        raise UserError(f"{folder}: no image with a same-stem .txt caption file found")
    return pairs


def read_pairs(path, **csv_kw):
    """Any of the pair formats, chosen by what `path` is."""
    if os.path.isdir(path):
        pairs = read_folder_pairs(path)
    elif path.endswith('.jsonl'):
        pairs = read_jsonl_pairs(path)
    elif path.endswith(('.csv', '.tsv')):
        pairs = read_csv_pairs(path, **csv_kw)
    else:
        raise UserError(f"{path}: expected a folder, a .jsonl, or a .csv/.tsv file")
    if not pairs:
        raise UserError(f"{path}: no (image, caption) pairs in it")
    return pairs


def split_captions(text):
    """TEXT, or several captions separated by '|' (DALLE-pytorch's generate.py convention)."""
    texts = [t.strip() for t in text.split('|')]
    if not all(texts):
        raise UserError(f"TEXT={text!r}: an empty caption between '|' separators")
    return texts


def caption_dirs(save_path, n):
    """SAVE_PATH for one caption; SAVE_PATH/<i> for caption i of several."""
    return [save_path] if n == 1 else [os.path.join(save_path, str(i)) for i in range(n)]


class PairDataset(torch.utils.data.Dataset):
    """(image, caption) pairs from read_pairs; a caption list yields a random one.
    Unreadable images are skipped (the next item is returned) and counted. With preload, every
    image is decoded once (a fixed transform to [-1, 1] only) and kept as uint8."""

    def __init__(self, pairs, transform, tokenize=None, preload=False):
        self.pairs, self.transform, self.tokenize = pairs, transform, tokenize
        self.bad = set()  # indices of unreadable files (skip_unreadable)
        self.cache = [self._decode(i) for i in range(len(pairs))] if preload else None

    def _decode(self, i):
        try:
            return (
                (self.transform(load_image(self.pairs[i][0])) * 127.5 + 127.5)
                .round()
                .to(torch.uint8)
            )
        except BadImage as e:
            self.bad.add(i)
            logging.getLogger('t2i').warning(f"skipping {e}")
            return None

    def _read(self, i):
        if self.cache is None:
            return self.transform(load_image(self.pairs[i][0]))
        if self.cache[i] is None:
            raise BadImage(f"{self.pairs[i][0]}: unreadable")
        return self.cache[i].float() / 127.5 - 1

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        i, img = skip_unreadable(self, i, self._read)
        path, text = self.pairs[i]
        if isinstance(text, (list, tuple)):
            text = text[np.random.randint(len(text))]
        return img, (self.tokenize(text) if self.tokenize else text)


def preload_images(paths, side):
    """Every distinct image of `paths` decoded once, shrunk (bicubic) to side x side when larger,
    as one uint8 tensor (N, 3, S, S), and each path's row in it. The images must be square and of
    one size (a batch is one tensor, and shrinking keeps the crop's geometry); an unreadable one
    is an error naming it."""
    from PIL import Image

    index, rows, first = {}, [], None
    for p in paths:
        if p not in index:
            try:
                img = load_image(p)
            except BadImage as e:
                raise UserError(f"DATA.PRELOAD: {e}; preloading reads every image")
            if first is None:
                first = (p, img.size)
            if img.size != first[1] or img.size[0] != img.size[1]:
                raise UserError(
                    f"DATA.PRELOAD: {p} is {img.size[0]}x{img.size[1]} px, {first[0]} "
                    f"{first[1][0]}x{first[1][1]}: preloading needs square images of one size"
                )
            if img.size[0] > side:
                img = img.resize((side, side), Image.BICUBIC)
            index[p] = len(rows)
            rows.append(torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(rows), [index[p] for p in paths]


def random_resized_crop_boxes(n, height, width, scale, ratio, generator=None):
    """(n, 4) boxes (left, top, right, bottom) drawn as torchvision's RandomResizedCrop.get_params
    draws one: up to 10 tries of an area share in `scale` and a log-uniform aspect in `ratio`,
    integer sides, a uniform integer corner; without a fitting try, the centre crop."""
    tries = 10
    area = height * width * torch.empty(n, tries).uniform_(*scale, generator=generator)
    aspect = torch.exp(
        torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    )
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)  # the first try that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    in_ratio = width / height  # the fallback: the whole image clamped to `ratio`, centred
    fw, fh = width, height
    if in_ratio < min(ratio):
        fh = round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw = round(height * max(ratio))
    found = fits.any(1)
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    u = torch.rand(n, 2, generator=generator)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return torch.stack([left, top, left + w, top + h], 1)


def random_resized_crop(images, size, scale, ratio=(3 / 4, 4 / 3), generator=None):
    """RandomResizedCrop for a whole uint8 batch (B, C, H, W) in one op: boxes as
    random_resized_crop_boxes, resampled to size x size by roi_align (bilinear, averaging
    ceil(box / size)^2 samples per output pixel, so shrinking is antialiased); float in [-1, 1]."""
    from torchvision.ops import roi_align

    boxes = random_resized_crop_boxes(len(images), *images.shape[2:], scale, ratio, generator)
    boxes = torch.cat([torch.arange(len(images), dtype=boxes.dtype)[:, None], boxes], 1)
    out = roi_align(images.float(), boxes.to(images.device), (size, size), 1.0, -1, True)
    return out / 127.5 - 1


# ----------------------------------------------------------------------------
# Text: DALLE's caption tokenizers (DALLE-pytorch tokenizer.py), 0 = padding; a checkpoint
# carries the spec
# ----------------------------------------------------------------------------
class DalleTokenizer:
    """encode(text) -> ids >= 1 (0 is padding), vocab_size, and a `spec` saved in checkpoints.
    clip: CLIP BPE without <sot>/<eot> as DALLE-pytorch's SimpleTokenizer, ids shifted by one so
    that BPE id 0 ('!') does not collide with padding (spec 'shift': 0 keeps SimpleTokenizer's
    own ids, for DALLE-pytorch checkpoints); chinese: BERT WordPiece (hfl/chinese-
    roberta-wwm-ext vocabulary) without [CLS]/[SEP], [PAD] = 0; words: AttnGAN tokenisation and
    a vocabulary of the training captions, 1 = <unk>."""

    def __init__(self, spec):
        self.spec, kind, path = spec, spec['kind'], spec.get('path', '')
        if kind == 'words':
            self.index = {w: i for i, w in enumerate(spec['vocab'])}
            self.vocab_size = len(spec['vocab'])
            return
        source = f"TEXT.TOKENIZER_PATH={path or '(default hub name)'}"
        if kind == 'clip':
            self.hf = load_hf_tokenizer('clip', path or 'openai/clip-vit-base-patch32', source)
            self.shift = int(spec.get('shift', 1))
            self.vocab_size = len(self.hf) + self.shift
        elif kind == 'chinese':
            self.hf = load_hf_tokenizer('bert', path or 'hfl/chinese-roberta-wwm-ext', source)
            self.shift, self.vocab_size = 0, self.hf.vocab_size
        else:
            raise UserError(f"TEXT.TOKENIZER={kind!r}: expected clip, chinese or words")

    @classmethod
    def from_captions(cls, captions):
        words = sorted({w for c in captions for w in tokenize_attngan(c)})
        return cls({'kind': 'words', 'vocab': ['<pad>', '<unk>'] + words})

    def encode(self, text):
        if self.spec['kind'] == 'words':
            return [self.index.get(w, 1) for w in tokenize_attngan(text)]
        return [i + self.shift for i in self.hf.encode(text, add_special_tokens=False)]

    def unknown_words(self, text):
        return (
            [w for w in tokenize_attngan(text) if w not in self.index]
            if self.spec['kind'] == 'words'
            else []
        )

    def tokenize(self, text, length, truncate):
        ids = self.encode(text)
        if len(ids) > length:
            if not truncate:
                raise UserError(
                    f"caption {text!r} has {len(ids)} tokens > TEXT_SEQ_LEN={length}; "
                    "use --truncate_captions or a longer --text_seq_len"
                )
            ids = ids[:length]
        return torch.tensor(ids + [0] * (length - len(ids)), dtype=torch.long)


# ----------------------------------------------------------------------------
# Metrics shared by every experiment (R-precision, CLIP score)
# ----------------------------------------------------------------------------
def check_r_precision_negatives(class_ids, n_neg, what='R-precision'):
    """Every image needs n_neg captions of other classes; checked before any training is spent."""
    counts = np.unique(np.asarray(class_ids), return_counts=True)[1]
    if len(class_ids) - counts.max() < n_neg:
        raise UserError(
            f"{what} needs {n_neg} captions of other classes for every image; only "
            f"{len(class_ids) - counts.max()} for the largest class ({len(class_ids)} images); "
            "lower EVAL.R_NEG or evaluate on more images"
        )


def r_precision(image_emb, text_emb, class_ids=None, n_neg=99, folds=10, seed=0):
    """R-precision as DM-GAN evaluates it: image i against its true caption
    (text_emb[i]) and n_neg captions of images of other classes, ranked by cosine;
    a hit when the true caption ranks first. Mean and std over `folds` equal
    folds (the original's slicing dropped one trial per fold; we do not).
    Returns (mean, std)."""
    img = torch.nn.functional.normalize(torch.as_tensor(image_emb, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.as_tensor(text_emb, dtype=torch.float64), dim=-1)
    n = img.shape[0]
    if txt.shape[0] != n:
        raise UserError(f"R-precision: {n} images but {txt.shape[0]} captions")
    cls = np.arange(n) if class_ids is None else np.asarray(class_ids)
    _, inverse, counts = np.unique(cls, return_inverse=True, return_counts=True)
    check_r_precision_negatives(cls, n_neg)
    rng = np.random.RandomState(seed)

    def negatives(i):
        """n_neg distinct captions of other classes, uniformly: draws without replacement
        by rejection (no O(n) scan per image); an exact choice where the pool is small."""
        if n - counts[inverse[i]] < 4 * n_neg:
            return rng.choice(np.flatnonzero(cls != cls[i]), n_neg, replace=False)
        while True:
            cand = rng.randint(0, n, 2 * n_neg)
            cand = cand[cls[cand] != cls[i]]
            cand = cand[np.sort(np.unique(cand, return_index=True)[1])]
            if len(cand) >= n_neg:
                return cand[:n_neg]

    hits = np.zeros(n, dtype=np.float64)
    for start in range(0, n, 256):
        rows = np.arange(start, min(n, start + 256))
        cand = torch.from_numpy(np.stack([np.concatenate([[i], negatives(i)]) for i in rows]))
        sims = torch.einsum('bkd,bd->bk', txt[cand], img[rows])  # true caption first
        hits[rows] = (
            (sims[:, 0] >= sims[:, 1:].max(1).values).double().numpy()
        )  # DM-GAN: argmax == 0
    per_fold = np.array_split(rng.permutation(hits), folds)
    scores = np.array([f.mean() for f in per_fold if len(f)])
    return float(scores.mean()), float(scores.std())


def clip_score(image_emb, text_emb, w=2.5):
    """CLIPScore (Hessel et al. 2021, Eq. 1): w * max(cos(image_i, text_i), 0) for each
    pair, averaged over the pairs; w = 2.5 as in the paper (some tools report 100 * cos)."""
    img = torch.nn.functional.normalize(torch.as_tensor(image_emb, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.as_tensor(text_emb, dtype=torch.float64), dim=-1)
    return float((w * (img * txt).sum(-1).clamp(min=0)).mean())


@torch.no_grad()
def encode_pairs(image_encoder, text_encoder, images, texts, batch_size=100):
    """Global image and sentence features of (image, caption) pairs, with any encoder
    pair of models.py's encoders API (DAMSM CNN/RNN, finetuned or scratch CLIP):
    image_encoder.encode(images in [-1, 1]) -> (regions, global),
    text_encoder.encode(list of str) -> (words, sent, pad_mask)."""
    dev = next(image_encoder.parameters()).device
    img, txt = [], []
    for i in range(0, len(texts), batch_size):
        img.append(image_encoder.encode(images[i : i + batch_size].to(dev))[1].float().cpu())
        txt.append(text_encoder.encode(list(texts[i : i + batch_size]))[1].float().cpu())
    return torch.cat(img), torch.cat(txt)


@torch.no_grad()
def encode_sentences(text_encoder, texts, batch_size=256):
    """Sentence features (on the CPU, float) of a list of captions, in batches."""
    return torch.cat(
        [
            text_encoder.encode(list(texts[i : i + batch_size]))[1].float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
    )


def clip_metrics(image_emb, text_emb, n_neg=99, folds=10, seed=0):
    """CLIP score and CLIP-R-precision (Park et al. 2021: the true caption against 99
    captions of other images, any class) on features from a CLIP-like encoder pair."""
    r_mean, r_std = r_precision(image_emb, text_emb, None, n_neg, folds, seed)
    return {
        'clip_score': clip_score(image_emb, text_emb),
        'clip_r_precision': r_mean,
        'clip_r_precision_std': r_std,
    }


# ----------------------------------------------------------------------------
# Metrics: image folders and Inception weights files (FID, IS)
# ----------------------------------------------------------------------------
FID_WEIGHTS = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = (
    'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
    'pt_inception-2015-12-05-6726825d.pth'
)
TV_INCEPTION_WEIGHTS = (
    'inception_v3_google-0cc3c7bd.pth'  # torchvision's IMAGENET1K_V1 file (IS, DAMSM's CNN)
)
TV_INCEPTION_WEIGHTS_URL = 'https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth'


# fid_score.py / inception_score.py --data: T2I_CLIP-GAN's presets (its fid_score.py hard-codes
# the generator's valid/single folder and the dataset's real images), in this repository's layout:
# what `main.py --cfg cfg/eval_clip_<data>.yml` writes, and the images of the AttnGAN layout.
EVAL_PRESETS = {
    'bird': ('output/eval_clip_bird/valid/single', 'data/birds/CUB_200_2011/images'),
    'coco': ('output/eval_clip_coco/valid/single', 'data/coco/images'),
}


def eval_preset(name):
    """The (generated, real) folders of a --data preset, said on stdout; one line when absent."""
    paths = EVAL_PRESETS[name]
    for what, p in zip(('generated images', 'real images'), paths):
        if not os.path.isdir(p):
            hint = f'main.py --cfg cfg/eval_clip_{name}.yml' if what[0] == 'g' else 'the dataset'
            raise UserError(f"--data {name}: {p}: no such folder ({what}; from {hint})")
    print(f"--data {name}: generated {paths[0]}, real {paths[1]}")
    return list(paths)


def folder_images(path):
    """pytorch-fid's file list: the images at the folder's top level. A folder with
    none there (pytorch-fid would fail) is searched recursively (the CUB layout)."""
    files = list_images(path, recursive=False) or list_images(path)
    if not files:
        raise UserError(f"{path}: no images ({', '.join(IMG_EXTENSIONS)})")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """uint8 HWC tensors: small to pass between processes; stacked, they are a
    channels_last batch for free."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(load_image(self.files[i])).copy())


def _stack(items):
    if len({tuple(t.shape) for t in items}) > 1:
        raise UserError(
            f"images of different sizes in one folder ({sorted({tuple(t.shape) for t in items})}); "
            "FID batches need one size"
        )
    return torch.stack(items)


def num_workers(n):
    """n < 0: pytorch-fid's default, min(8, available CPUs)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return min(8, cpus) if n < 0 else n


def batches(files, batch_size, workers, device):
    """RGB in [0, 1] (ToTensor's x / 255), (B, 3, H, W) channels_last, on device."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        ImageFiles(files),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers(workers),
        collate_fn=_stack,
        pin_memory=device.type == 'cuda',
    )
    for x in loader:
        yield x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div(255)


def hub_cached(*filenames):
    """The first of `filenames` present in torch hub's cache (its checkpoints folder, where
    pytorch-fid and torchvision keep their downloads), else where the first would be: callers
    test os.path.isfile and name that path in their error. Nothing is downloaded here."""
    paths = [os.path.join(torch.hub.get_dir(), 'checkpoints', f) for f in filenames]
    return next((p for p in paths if os.path.isfile(p)), paths[0])


def weights_path(path, filename, url, hint=''):
    """--weights wins; else torch hub's cache (hub_cached)."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--weights {path}: file not found")
        return path
    cached = hub_cached(filename)
    if os.path.isfile(cached):
        return cached
    raise UserError(
        f"no weights: put {filename} ({url}) in {os.path.dirname(cached)}/ "
        f"or pass --weights PATH{hint}"
    )


def load_state_dict(net, path):
    """A plain state dict file (torch.load weights_only) into net, strict."""
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable weights file ({type(e).__name__}: {e})")
    if not isinstance(sd, dict):
        raise UserError(f"{path}: expected a state dict")
    missing, unexpected = set(net.state_dict()) - set(sd), set(sd) - set(net.state_dict())
    if missing or unexpected:
        raise UserError(
            f"{path}: not {type(net).__name__} weights (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    net.load_state_dict(sd)
    return net


# ----------------------------------------------------------------------------
# Metrics: FID statistics and the Fréchet distance (pytorch-fid 0.3.0's numbers)
# ----------------------------------------------------------------------------
class FeatureNet:
    """images in [0, 1] -> float64 features; `name` keeps saved statistics honest;
    `weights_path` and `resize` (what the network does to the images) go into the protocol."""

    def __init__(self, fn, dims, name, weights_path=None, resize=None):
        self.fn, self.dims, self.name = fn, dims, name
        self.weights_path, self.resize = weights_path, resize

    @torch.inference_mode()
    def __call__(self, x):
        return self.fn(x).double().cpu().numpy()


def activations(files, net, batch_size=50, workers=-1, device='cpu', desc='features'):
    out = np.empty((len(files), net.dims))
    n = 0
    for x in progress(
        batches(files, batch_size, workers, device),
        total=-(-len(files) // batch_size),
        desc=desc,
        every=20,
    ):
        out[n : n + len(x)] = net(x)
        n += len(x)
    return out


def statistics(act, name='images'):
    """Mean and covariance in float64 (np.mean / np.cov, as pytorch-fid)."""
    act = np.asarray(act, dtype=np.float64)
    if act.shape[0] <= act.shape[1]:
        warnings.warn(
            f"{name}: {act.shape[0]} images for {act.shape[1]} features: the covariance is "
            f"singular and FID is biased and unstable; use more than {act.shape[1]} images "
            "(the papers use 30,000-50,000)",
            stacklevel=2,
        )
    if not np.isfinite(act).all():
        raise UserError(f"{name}: non-finite activations (NaN/inf images or weights)")
    return act.mean(axis=0), np.cov(act, rowvar=False)


def path_statistics(path, net, batch_size=50, workers=-1, device='cpu'):
    """(mu, sigma) of a folder of images or of a saved .npz (`mu`, `sigma`)."""
    if path.endswith('.npz'):
        if not os.path.isfile(path):
            raise UserError(f"{path}: statistics file not found")
        with np.load(path) as f:
            if 'mu' not in f or 'sigma' not in f:
                raise UserError(f"{path}: expected arrays 'mu' and 'sigma' (pytorch-fid's .npz)")
            mu, sigma, feature = (
                f['mu'][:],
                f['sigma'][:],
                str(f['feature']) if 'feature' in f else None,
            )
        if feature is not None and feature != net.name:
            raise UserError(f"{path}: statistics of {feature} features; this run uses {net.name}")
        if mu.shape != (net.dims,):
            raise UserError(
                f"{path}: {mu.shape[0]}-d statistics; this run uses {net.dims} ({net.name})"
            )
        return mu, sigma
    files = folder_images(path)
    return statistics(
        activations(files, net, batch_size, workers, device, desc=os.path.basename(path)), path
    )


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
        raise UserError(f"statistics of different sizes: {mu1.shape[0]}-d and {mu2.shape[0]}-d")
    diff = mu1 - mu2
    if method == 'sqrtm':
        from scipy import linalg  # here: the scripts that import utils need no scipy

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
        if residue > 1e-3:  # rank-deficient covariances (fewer images than dims): the eigenvalues
            # of S1 S2 carry rounding noise; pytorch-fid's route answers these cases, so take it
            return frechet_distance(mu1, sigma1, mu2, sigma2, eps, 'sqrtm')
    else:
        raise ValueError(method)
    if residue > 1e-3:
        raise UserError(
            f"imaginary component {residue:.3g} in the square root of S1 S2 (pytorch-fid "
            "refuses these statistics too); compute them from more images"
        )
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------
# Metrics: Inception Score (improved-GAN's computation)
# ----------------------------------------------------------------------------
def inception_score(logits, splits=10, shuffle_seed=None):
    """(mean, std) of exp(mean KL(p(y|x) || p(y))) over `splits` consecutive splits
    (boundaries i*N//splits, as the original), in float64 from log-softmax.
    shuffle_seed: permute the samples first with RandomState(seed), as torch-fidelity
    does by default (seed 2020); None keeps the original's order."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    n = logits.shape[0]
    if n < splits:
        raise UserError(f"{n} images for {splits} splits; the papers use 30,000-50,000")
    if shuffle_seed is not None:
        logits = logits[np.random.RandomState(shuffle_seed).permutation(n)]
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_py = torch.logsumexp(part, dim=0) - np.log(len(part))  # log p(y), the split's marginal
        kl = (part.exp() * (part - log_py)).sum(dim=1)  # KL(p(y|x) || p(y)) per image
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------
# Metrics: the shapes judge (models.ShapesJudge and judge_loss; its training: train_judge.py)
# ----------------------------------------------------------------------------
# The synthetic world's vocabulary (preprocess_data.py draws it), in the order of the judge's heads.
SHAPES = ['circle', 'square', 'triangle', 'diamond', 'star', 'cross']
COLOURS = {
    'red': (220, 30, 30),
    'orange': (245, 140, 20),
    'yellow': (240, 220, 30),
    'green': (40, 170, 60),
    'cyan': (30, 200, 210),
    'blue': (30, 70, 220),
    'purple': (140, 50, 190),
    'pink': (245, 120, 190),
}
SIZES = {'small': 0.12, 'large': 0.21}  # radius as a share of the image side
ATTRIBUTES = ('shape', 'colour', 'size')
SHAPES_KEY_RE = re.compile(r'(\d{3}\.[a-z]+_[a-z]+)[/\\]([a-z]+_[a-z]+_\d{5})')


def caption_attributes(data_dir):
    """attributes.json reduced to what the captions name: each object's shape,
    colour, size and cell (reading order) and the relation of object 1 to object 2."""
    path = os.path.join(data_dir, 'attributes.json')
    if not os.path.isfile(path):
        raise UserError(
            f"{path}: missing (the synthetic dataset's ground truth; "
            "python preprocess_data.py --cfg cfg/preprocess/shapes.yml)"
        )
    with open(path) as f:
        attrs = json.load(f)
    return {
        k: {
            'objects': [{a: o[a] for a in ATTRIBUTES + ('cell',)} for o in v['objects']],
            'relation': v['relation'],
        }
        for k, v in attrs.items()
    }


def swapped_captions(caption, seed=0):
    """Minimal pairs for a text encoder: for each attribute the caption names with exactly one
    of its canonical words (a shape, a colour, a size), the caption with that word replaced by
    another of its kind, drawn from `seed`. Captions naming it only by a synonym are left out."""
    rng = random.Random(seed)
    words = {'shape': SHAPES, 'colour': list(COLOURS), 'size': list(SIZES)}
    pairs = {}
    for attribute, kind in words.items():
        found = [w for w in kind if re.search(rf'\b{w}\b', caption)]
        if len(found) == 1:
            other = rng.choice([w for w in kind if w != found[0]])
            pairs[attribute] = re.sub(rf'\b{found[0]}\b', other, caption)
    return pairs


@torch.no_grad()
def swap_accuracy(image_emb, text_encoder, captions, seed=0, batch_size=256):
    """Per attribute, how often an image is closer (cosine of global features) to its own
    caption than to the caption with that attribute's word swapped (swapped_captions): what an
    encoder tells apart, and so what of a caption can reach a generator conditioned on it.
    Returns {'swap_<attribute>': accuracy, 'swap_<attribute>_pairs': count}."""
    rows = [
        (i, a, text)
        for i, cap in enumerate(captions)
        for a, text in swapped_captions(cap, seed + i).items()
    ]
    if not rows:
        return {}
    sent = encode_sentences(text_encoder, list(captions) + [t for *_, t in rows], batch_size)
    img = torch.nn.functional.normalize(torch.as_tensor(image_emb).float(), dim=-1)
    sent = torch.nn.functional.normalize(sent, dim=-1)
    own = (img * sent[: len(captions)]).sum(-1)
    wins = collections.defaultdict(list)
    for k, (i, a, _) in enumerate(rows):
        wins[a].append(bool(own[i] > img[i] @ sent[len(captions) + k]))
    out = {}
    for a in ATTRIBUTES:
        if wins[a]:
            out[f'swap_{a}'], out[f'swap_{a}_pairs'] = float(np.mean(wins[a])), len(wins[a])
    return out


def shapes_key(path):
    """The dataset key (NNN.colour_shape/colour_shape_NNNNN) named in an image's path."""
    m = SHAPES_KEY_RE.search(path.replace(os.sep, '/'))
    if not m:
        raise UserError(
            f"{path}: no shapes key (<NNN.colour_shape>/<colour_shape_NNNNN>) in the "
            "path; list each file's key in keys.json in the folder"
        )
    return f'{m.group(1)}/{m.group(2)}'


def cell_targets(scene):
    """(9, 4): occupied, shape, colour, size index per cell (-1 where empty)."""
    t = torch.full((9, 4), -1, dtype=torch.long)
    t[:, 0] = 0
    colours, sizes = list(COLOURS), list(SIZES)
    for o in scene['objects']:
        t[o['cell']] = torch.tensor(
            [1, SHAPES.index(o['shape']), colours.index(o['colour']), sizes.index(o['size'])]
        )
    return t


def to_judge(x_uint8, device):
    return (x_uint8.to(device).float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def judge_predict(judge, images):
    """The objects the judge sees in a batch (RGB in [-1, 1]), reading order."""
    dev = next(judge.parameters()).device
    occ, shape, colour, size = judge(
        images.to(dev).float().contiguous(memory_format=torch.channels_last)
    )
    occ, shape, colour, size = occ[..., 0] > 0, shape.argmax(-1), colour.argmax(-1), size.argmax(-1)
    colours, sizes = list(COLOURS), list(SIZES)
    return [
        [
            {
                'cell': c,
                'shape': SHAPES[shape[n, c]],
                'colour': colours[colour[n, c]],
                'size': sizes[size[n, c]],
            }
            for c in occ[n].nonzero()[:, 0].tolist()
        ]
        for n in range(len(occ))
    ]


def relation_holds(relation, cell1, cell2):
    """The caption's relation of object 1 to object 2, read on the named axis of the
    judged cells: 'to the left of' = a column left of object 2's, 'above' = a row above."""
    (r1, c1), (r2, c2) = divmod(cell1, 3), divmod(cell2, 3)
    return {
        'to the left of': c1 < c2,
        'to the right of': c1 > c2,
        'above': r1 < r2,
        'below': r1 > r2,
    }[relation]


def judge_scene(pred, truth):
    """One image against its caption's attributes. Caption objects are matched to the
    judged objects one to one, maximising (attribute hits, position correct); a caption
    object left unmatched misses every attribute."""
    objs, best = truth['objects'], None
    for perm in itertools.permutations(range(len(pred)), min(len(objs), len(pred))):
        hits = [[pred[p][a] == objs[j][a] for a in ATTRIBUTES] for j, p in enumerate(perm)]
        hits += [[False] * len(ATTRIBUTES)] * (len(objs) - len(perm))
        if len(pred) != len(objs):  # extra (or missing) objects: no position credit, or an image
            position = False  # of objects everywhere would have every lone object's cell
        elif len(objs) == 1:
            position = pred[perm[0]]['cell'] == objs[0]['cell']
        else:
            position = relation_holds(
                truth['relation'], pred[perm[0]]['cell'], pred[perm[1]]['cell']
            )
        score = (sum(map(sum, hits)), position)
        if best is None or score > best[0]:
            best = (score, hits, position)
    _, hits, position = best
    return {
        'count': len(pred) == len(objs),
        'hits': hits,
        'position': position,
        'all': len(pred) == len(objs) and position and all(map(all, hits)),
    }


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
        return (
            f"position: not {truth['relation']}"
            if len(objs) == 2
            else f"position: object not in cell {objs[0]['cell']} (reading order)"
        )
    return ''


BREAKDOWN = (
    'single_object',
    'two_objects',
    'counting',
    'colours',
    'position',
    'colour_attribution',
)


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

    return {
        'single_object': share(one, lambda s: s['count'] and s['hits'][0][i_shape]),
        'two_objects': share(two, lambda s: s['count'] and all(h[i_shape] for h in s['hits'])),
        'counting': share(list(zip(scenes, truths)), lambda s: s['count']),
        'colours': share(
            one, lambda s: s['count'] and s['hits'][0][i_shape] and s['hits'][0][i_colour]
        ),
        'position': share(list(zip(scenes, truths)), lambda s: s['position']),
        'colour_attribution': share(
            two, lambda s: s['count'] and all(h[i_shape] and h[i_colour] for h in s['hits'])
        ),
    }


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
        raise UserError(
            f"{missing[0]}: not a key of the judge's dataset ({len(missing)} unknown keys)"
        )
    chunks = torch.split(images, 250) if torch.is_tensor(images) else images
    preds = [p for x in chunks for p in judge_predict(judge, x)]
    if len(preds) != len(keys):
        raise UserError(f"{len(preds)} images for {len(keys)} keys")
    scenes = [judge_scene(p, attributes[k]) for p, k in zip(preds, keys)]
    hits = np.array([h for s in scenes for h in s['hits']], dtype=np.float64)
    out = {'count': np.mean([s['count'] for s in scenes])}
    out.update({a: hits[:, i].mean() for i, a in enumerate(ATTRIBUTES)})
    out.update(
        position=np.mean([s['position'] for s in scenes]), all=np.mean([s['all'] for s in scenes])
    )
    truths = [attributes[k] for k in keys]
    if records is not None:
        records += [
            {
                'key': k,
                'category': 'one object' if len(t['objects']) == 1 else 'two objects',
                'correct': bool(s['all']),
                'reason': scene_reason(p, t, s),
            }
            for k, p, t, s in zip(keys, preds, truths, scenes)
        ]
    out = {k: float(v) for k, v in out.items()}
    return {**out, **{f'breakdown_{k}': v for k, v in judge_breakdown(scenes, truths).items()}}


# ----------------------------------------------------------------------------
# Evaluation: one path for every generator
# ----------------------------------------------------------------------------
# A generator is scored by a sampler, a function from a batch of caption records ({'key',
# 'caption', 'class'} and whatever else its sampler reads) to images in [-1, 1], and metric
# plug-ins: start(image_size), add(images, records) per batch, result() -> {name: value}. The
# networks a plug-in uses are built by the caller (models.py's loaders) and passed in.
def to_uint8(images):
    """Images in [-1, 1] -> uint8 on the CPU, the values a PNG file of them holds."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def derangement(n, seed):
    """A seeded map of range(n) into itself without fixed points (another image's caption for
    each): a permutation whose fixed points i are sent to i + 1 instead (so, rarely, two
    images share one caption)."""
    perm = np.random.RandomState(seed).permutation(n)
    return np.where(perm == np.arange(n), (perm + 1) % n, perm)


_SHA256 = {}


def sha256(path):
    """Hex SHA-256 of a file's bytes; read once per (path, size, mtime), since a learning curve
    or repeated samplings name the same encoders and judge in every result."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


class JudgeAccuracy:
    """The shapes judge's attribute accuracy and breakdown (judge_accuracy) of each image against
    its record's key: judge_*. Each record gets its verdict (category, correct, reason), the
    lines of judge.jsonl. The images wait for the judge as `store` says: uint8 (what their PNG
    files hold), half or float; `chunk` images go through the judge at a time."""

    def __init__(self, judge, store='uint8', chunk=250):
        if store not in ('uint8', 'half', 'float'):
            raise ValueError(f"store={store!r}: expected uint8, half or float")
        self.judge, self.store, self.chunk = judge, store, chunk

    def start(self, size):
        self.images, self.records = [], []

    def add(self, images, records):
        self.images.append(
            to_uint8(images)
            if self.store == 'uint8'
            else images.half().cpu()
            if self.store == 'half'
            else images.float().cpu()
        )
        self.records += records

    def batches(self):
        """The stored images in [-1, 1], `chunk` at a time."""
        for x in torch.cat(self.images).split(self.chunk):
            yield x.float() / 127.5 - 1 if self.store == 'uint8' else x.float()

    def result(self):
        verdicts = []
        acc = judge_accuracy(
            self.judge, self.batches(), [r['key'] for r in self.records], records=verdicts
        )
        for r, v in zip(self.records, verdicts):
            r.update(category=v['category'], correct=v['correct'], reason=v['reason'])
        return {f'judge_{k}': v for k, v in acc.items()}


VERDICT_FIELDS = ('file', 'caption', 'key', 'category', 'correct', 'reason')


def write_verdicts(path, records):
    """judge.jsonl: one line per image scored by JudgeAccuracy, what failed, to look at."""
    atomic_write_text(
        path, ''.join(json.dumps({k: r[k] for k in VERDICT_FIELDS}) + '\n' for r in records)
    )


class ShuffledJudge:
    """The images of a JudgeAccuracy plug-in judged against other records' keys, image i against
    the key of record permutation(n)[i]: shuffled_judge_*, what drawing without reading the
    caption scores."""

    def __init__(self, accuracy, permutation):
        self.accuracy, self.permutation = accuracy, permutation

    def start(self, size):
        pass

    def add(self, images, records):
        pass

    def result(self):
        keys = [r['key'] for r in self.accuracy.records]
        wrong = [keys[j] for j in self.permutation(len(keys))]
        acc = judge_accuracy(self.accuracy.judge, self.accuracy.batches(), wrong)
        return {f'shuffled_judge_{k}': v for k, v in acc.items()}


class PairFeatures:
    """Global image and caption features of every (image, record caption) pair (encode_pairs),
    for RPrecision and CLIPScore to share: the encoders run once."""

    def __init__(self, text_encoder, image_encoder):
        self.text_encoder, self.image_encoder = text_encoder, image_encoder

    def start(self, size):
        self.img, self.txt = [], []

    def add(self, images, records):
        img, txt = encode_pairs(
            self.image_encoder, self.text_encoder, images, [r['caption'] for r in records]
        )
        self.img.append(img)
        self.txt.append(txt)

    def features(self):
        return torch.cat(self.img), torch.cat(self.txt)

    def result(self):
        return {}


class RPrecision:
    """R-precision (r_precision: DM-GAN's protocol) of the images against their captions, the
    negatives n_neg captions of records of other classes."""

    def __init__(self, features, n_neg=99, folds=10, seed=0):
        self.features, self.n_neg, self.folds, self.seed = features, n_neg, folds, seed

    def start(self, size):
        self.classes = []

    def add(self, images, records):
        self.classes += [r['class'] for r in records]

    def result(self):
        mean, std = r_precision(
            *self.features.features(),
            self.classes,
            n_neg=self.n_neg,
            folds=self.folds,
            seed=self.seed,
        )
        return {'r_precision': mean, 'r_precision_std': std}


class CLIPScore:
    """CLIPScore (clip_score) of the images and their captions on the encoders' features."""

    def __init__(self, features):
        self.features = features

    def start(self, size):
        pass

    def add(self, images, records):
        pass

    def result(self):
        return {'clip_score': clip_score(*self.features.features())}


def encoder_plugins(text_encoder, image_encoder, n_neg=99, folds=10, seed=0):
    """R-precision and CLIP score on one encoding of the pairs."""
    features = PairFeatures(text_encoder, image_encoder)
    return [features, RPrecision(features, n_neg, folds, seed), CLIPScore(features)]


class FID:
    """FID (frechet_distance) of the images' features (`net`, a FeatureNet on images in [0, 1])
    against `real(size)`, the real images' (mu, sigma) at the images' size."""

    def __init__(self, net, real):
        self.net, self.real = net, real

    def start(self, size):
        self.reference, self.act = self.real(size), []

    def add(self, images, records):
        self.act.append(self.net((images + 1) / 2))

    def result(self):
        mu, sigma = statistics(np.concatenate(self.act), 'generated images')
        return {'fid': frechet_distance(mu, sigma, *self.reference)}


class InceptionScore:
    """IS (inception_score) in `splits` splits of the logits of `net` (images in [0, 1] -> logits)."""

    def __init__(self, net, splits=1):
        self.net, self.splits = net, splits

    def start(self, size):
        self.logits = []

    def add(self, images, records):
        self.logits.append(self.net((images + 1) / 2).double().cpu())

    def result(self):
        return {'is': inception_score(torch.cat(self.logits), self.splits)[0]}


class ImageDump:
    """Each image as a PNG named by its record's 'file' in `folder`, and keys.json (file ->
    dataset key), what fid_score.py, inception_score.py and the judge read. Given `real` (dataset
    key -> that image in [-1, 1], (3, H, W)), also grid.png in the folder above (outside the
    folder FID reads): the first `grid` real images above the generated ones, their captions
    numbered in grid.txt."""

    def __init__(self, folder, real=None, grid=10):
        self.folder, self.real, self.grid = folder, real, grid

    def start(self, size):
        os.makedirs(self.folder, exist_ok=True)
        self.keys, self.shown = {}, []

    def add(self, images, records):
        for im, r in zip(images, records):
            save_image_grid(im[None], os.path.join(self.folder, r['file']), nrow=1)
            self.keys[r['file']] = r['key']
            if self.real is not None and len(self.shown) < self.grid:
                self.shown.append((im.detach().float().cpu(), r))

    def result(self):
        atomic_write_text(os.path.join(self.folder, 'keys.json'), json.dumps(self.keys, indent=0))
        if self.shown:
            parent = os.path.dirname(os.path.abspath(self.folder))
            fakes = [im for im, _ in self.shown]
            reals = [
                torch.nn.functional.interpolate(
                    self.real(r['key'])[None].float(),
                    size=im.shape[-2:],
                    mode='bilinear',
                    antialias=True,
                )[0]
                for im, r in self.shown
            ]
            save_image_grid(
                torch.stack(reals + fakes), os.path.join(parent, 'grid.png'), len(fakes)
            )
            atomic_write_text(
                os.path.join(parent, 'grid.txt'),
                ''.join(f"{i}. {r.get('caption', '')}\n" for i, (_, r) in enumerate(self.shown, 1)),
            )
        return {}


def protocol(split, num_images, seed, image_size, resize, weights):
    """How a score was measured, stored beside it: the split, the number of images, the seed(s),
    the images' side, how images were resized (a description, or None), and each weights file
    used ({name: path}; None: not used) with its sha256."""
    return {
        'split': split,
        'num_images': num_images,
        'seed': seed,
        'image_size': image_size,
        'resize': resize,
        'weights': {
            name: {'path': path, 'sha256': sha256(path)} for name, path in weights.items() if path
        },
    }


def folder_protocol(files, seed, resize, weights):
    """The protocol of a score of image files (no dataset split): their number and the side of
    the first (batches refuse images of mixed sizes)."""
    return protocol(None, len(files), seed, load_image(files[0]).size[0], resize, weights)


class Interrupted(Exception):
    """A stop request between two batches of evaluate_generator: the result in progress is dropped."""


def caption_batches(records, batch_size, per_pass=False):
    """Consecutive batches of batch_size records; with per_pass, a batch ends where the records'
    'pass' changes (DM-GAN's sampling restarts its batches at each pass over the test set)."""
    batch = []
    for r in records:
        if batch and (len(batch) == batch_size or (per_pass and r['pass'] != batch[-1]['pass'])):
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


@torch.no_grad()
def evaluate_generator(
    sampler,
    records,
    metrics,
    batch_size,
    split,
    seed,
    weights,
    image_size,
    resize=None,
    per_pass=False,
    stop=None,
    log=None,
):
    """Every metric plug-in over the images `sampler` draws for `records`, batch by batch. Returns
    the plug-ins' scores and `protocol` (protocol(): the split, number of images, seed, image size
    and the resizing the caller names, and the weights files used ({name: path}) with their sha256).
    `stop()`, asked before each batch, raises Interrupted when true; progress lines go to `log`."""
    for m in metrics:
        m.start(image_size)
    bar = progress(
        total=len(records),
        desc='score',
        every=max(1, len(records) // 10),
        log=log,
        disable=None if log else True,
    )
    for batch in caption_batches(records, batch_size, per_pass):
        if stop is not None and stop():
            raise Interrupted()
        images = sampler(batch)
        for m in metrics:
            m.add(images, batch)
        bar.update(len(batch))
    bar.close()
    scores = {k: v for m in metrics for k, v in m.result().items()}
    return {**scores, 'protocol': protocol(split, len(records), seed, image_size, resize, weights)}
