"""The embedded 10-minute recipes, several seeds each, and one table of the judge's accuracy.

    python bench/shapes.py                                  # every system, seeds 0 1 2
    python bench/shapes.py --systems dmgan_clip --seeds 0   # one recipe, one seed
    python bench/shapes.py --systems dmgan_clip --jobs 3    # its seeds at once, a CPU thread each

For each system: its text encoder (and XMC-GAN's caption embeddings, DALLE's VAE) is made once
(seed 0) with its cfg, unless the file its cfg names is already there; then, per seed, the
generator is trained with its cfg and scored on the 1,000 test captions (one image each, the
judge, R-precision with the encoder it is conditioned on, DALLE with the CLIP from scratch,
baselines; DALLE also the CLIP's top-1 of EVAL.RERANK samples per caption). Prints mean +- std
over the seeds beside the encoder's R-precision on the real test images and the baselines, and
writes <out>/shapes.json. Each run's learning curve is <out>/<system>_seed<N>_eval/curve.png
(DALLE: <out>/dalle_seed<N>/curve.png).
"""

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# system: the commands that train what conditions or tokenises it, each with the file it writes
# (run once, seed 0, unless that file exists); the generator's training command; its evaluation
# cfg (None: training ends with the evaluation), the key that points it at the run and its other
# settings; the run dir whose R-precision on the real test images the generator's is measured
# against.
CLIP = (
    ['pretrain_DAMSM.py', '--cfg', 'cfg/clip_shapes.yml'],
    'output/clip_shapes/checkpoints/text_encoder3.pth',
)
SYSTEMS = {
    'dmgan_clip': dict(
        prep=[CLIP],
        train=['main.py', '--cfg', 'cfg/shapes_DMGAN.yml'],
        eval=('cfg/eval_shapes_DMGAN.yml', 'TRAIN.NET_G', [f'TRAIN.NET_E={CLIP[1]}']),
        encoder_run='output/clip_shapes',
    ),
    'dmgan_damsm': dict(
        prep=[
            (
                ['pretrain_DAMSM.py', '--cfg', 'cfg/DAMSM/shapes.yml'],
                'output/DAMSM_shapes/checkpoints/text_encoder7.pth',
            )
        ],
        train=['main.py', '--cfg', 'cfg/shapes_DMGAN_DAMSM.yml'],
        eval=(
            'cfg/eval_shapes_DMGAN.yml',
            'TRAIN.NET_G',
            ['TRAIN.NET_E=output/DAMSM_shapes/checkpoints/text_encoder7.pth'],
        ),
        encoder_run='output/DAMSM_shapes',
    ),
    'xmc': dict(
        prep=[
            CLIP,
            (
                ['preprocess_data.py', '--cfg', 'cfg/preprocess/shapes_text.yml'],
                'data/shapes/xmc_text/index.json',
            ),
        ],
        train=['main.py', '--cfg', 'cfg/shapes_xmc.yml'],
        eval=('cfg/eval_shapes_xmc.yml', 'EVAL.WORKDIR', []),
        encoder_run='output/clip_shapes',
    ),
    'dalle': dict(
        prep=[
            CLIP,
            (['train_vae.py', '--cfg', 'cfg/dalle/shapes_vae.yml'], 'output/shapes_vae/vae.pt'),
        ],
        train=[
            'train_dalle.py',
            '--cfg',
            'cfg/dalle/shapes_dalle.yml',
            '--vae_path',
            'output/shapes_vae/vae.pt',
        ],
        eval=None,
        encoder_run='output/clip_shapes',
    ),
}
COLUMNS = ('count', 'shape', 'colour', 'size', 'position', 'all')
TARGETS = {
    'count': 0.90,
    'shape': 0.85,
    'colour': 0.90,
    'size': 0.90,
    'position': 0.85,
    'all': 0.60,
}


def run(cmd, log):
    t0 = time.time()
    with open(log, 'w') as f:
        r = subprocess.run([sys.executable] + cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}); see {log}")
    return time.time() - t0


def metrics(run_dir):
    with open(os.path.join(ROOT, run_dir, 'metrics.json')) as f:
        return json.load(f)


def train_and_score(name, seed, args):
    """One seed of a system: its generator trained with the system's cfg, then scored."""
    sys_ = SYSTEMS[name]
    gen_dir, eval_dir = f'{args.out}/{name}_seed{seed}', f'{args.out}/{name}_seed{seed}_eval'
    # several seeds at once: one CPU thread each, so they do not contend for the cores
    threads = ['--set', 'CPU_THREADS=1'] if args.jobs > 1 else []
    train_s = run(
        sys_['train']
        + [
            '--seed',
            str(seed),
            '--out',
            gen_dir,
            '--overwrite',
            '--set',
            f'EVAL.JUDGE={args.judge}',
        ]
        + threads
        + [a for kv in args.set for a in ('--set', kv)],
        os.path.join(ROOT, gen_dir + '.log'),
    )
    if sys_['eval']:
        eval_cfg, run_key, sets = sys_['eval']
        run(
            ['main.py', '--cfg', eval_cfg, '--out', eval_dir, '--overwrite']
            + [a for kv in [f'{run_key}={gen_dir}', *sets] for a in ('--set', kv)]
            + ['--set', f'EVAL.JUDGE={args.judge}']
            + threads
            + [a for kv in args.set if not kv.startswith('TRAIN.') for a in ('--set', kv)],
            os.path.join(ROOT, eval_dir + '.log'),
        )
    m = metrics(eval_dir if sys_['eval'] else gen_dir)
    if 'latest' in m:  # XMC-GAN's evaluation: one entry per checkpoint
        m = m[f"eval/{m['latest']}"]
    row = {
        'seed': seed,
        'train_seconds': metrics(gen_dir)['train_seconds'],
        'wall_seconds': train_s,
        **m,
    }
    print(
        f"{name} seed {seed}: "
        + ' '.join(f"{c} {m[f'judge_{c}']:.3f}" for c in COLUMNS)
        + f" R-precision {m['r_precision']:.3f} ({row['train_seconds']:.0f} s)",
        flush=True,
    )
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--systems', nargs='+', default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--out', default='output/bench_shapes')
    p.add_argument('--judge', default='output/judge', help='train_judge.py run dir')
    p.add_argument(
        '--set',
        action='append',
        default=[],
        help="KEY=VALUE for the generators' training cfg (and, but TRAIN.*, their evaluation's)",
    )
    p.add_argument(
        '--jobs',
        type=int,
        default=1,
        help='seeds trained at once, one CPU thread each (1: in turn)',
    )
    args = p.parse_args()
    if args.jobs < 1:
        p.error(f'--jobs {args.jobs}: expected 1 or more')
    os.makedirs(os.path.join(ROOT, args.out), exist_ok=True)
    result = {
        'date': time.strftime('%Y-%m-%d %H:%M'),
        'cpus': os.cpu_count(),
        'machine': platform.processor() or platform.machine(),
        'systems': {},
    }
    failed = []
    for name in args.systems:
        sys_ = SYSTEMS[name]
        prep_seconds = None
        for k, (cmd, made) in enumerate(sys_['prep']):
            if os.path.isfile(os.path.join(ROOT, made)):
                print(f"{name}: reusing {made} (delete it to remake it: {' '.join(cmd)})")
            else:
                try:
                    prep_seconds = (prep_seconds or 0) + run(
                        cmd, os.path.join(ROOT, args.out, f'{name}_prep{k}.log')
                    )
                except RuntimeError as e:
                    sys.exit(f'bench/shapes.py: {e}')
        enc_r = metrics(sys_['encoder_run'])
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            runs = {seed: pool.submit(train_and_score, name, seed, args) for seed in args.seeds}
        rows = []
        for seed, run_ in runs.items():
            if run_.exception():
                failed.append(f'{name} seed {seed}: {run_.exception()}')
            else:
                rows.append(run_.result())
        if not rows:
            continue
        result['systems'][name] = {
            'prepared': [made for _, made in sys_['prep']],
            'encoder_r_precision': enc_r.get('R_precision'),
            'prep_seconds': prep_seconds,
            'runs': rows,
        }
    with open(os.path.join(ROOT, args.out, 'shapes.json'), 'w') as f:
        json.dump(result, f, indent=1)
    head = ['system'] + list(COLUMNS) + ['R-precision', 'encoder R-precision', 'training s']
    print('| ' + ' | '.join(head) + ' |\n|' + '---|' * len(head))
    for name, s in result['systems'].items():
        runs = s['runs']

        def cell(key):
            v = np.array([r[key] for r in runs], dtype=float)
            return f'{v.mean():.3f} ± {v.std():.3f}' if len(v) > 1 else f'{v[0]:.3f}'

        print(
            f"| {name} ({len(runs)} seeds) | "
            + ' | '.join(cell(f'judge_{c}') for c in COLUMNS)
            + f" | {cell('r_precision')} | {s['encoder_r_precision']:.3f} | {cell('train_seconds')} |"
        )
        if 'rerank_judge_all' in runs[0]:  # DALLE: the encoder's top-1 of EVAL.RERANK samples
            print(
                f"| {name}: top-1 of {runs[0]['rerank_samples']} by the CLIP | "
                + ' | '.join(cell(f'rerank_judge_{c}') for c in COLUMNS)
                + f" | {cell('rerank_r_precision')} (the ranking encoder's) | | |"
            )
        r0 = runs[0]
        for label, prefix in (
            ('untrained', 'untrained_judge_'),
            ('own images, shuffled captions', 'shuffled_judge_'),
            ('real image, wrong caption', 'wrong_caption_judge_'),
            ('real image', 'real_judge_'),
        ):
            if f'{prefix}all' in r0:
                print(
                    f"| {name}: {label} | "
                    + ' | '.join(f"{r0[prefix + c]:.3f}" for c in COLUMNS)
                    + ' | | | |'
                )
    print('targets: ' + ', '.join(f'{c} >= {t}' for c, t in TARGETS.items()))
    if failed:
        sys.exit('bench/shapes.py: ' + '; '.join(failed))


if __name__ == '__main__':
    main()
