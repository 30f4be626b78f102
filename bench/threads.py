"""Training speed of the embedded recipes at each number of torch CPU threads (CPU_THREADS),
in one run: a short training of each recipe per thread count, the counts taking turns over the
rounds so that a busy machine slows them alike; prints seconds per step (the training loop's
own train_seconds / train_steps of metrics.json) and the speed-up over the largest count
(on this project's 2-core machines, torch's default).

    python bench/threads.py                       # every recipe whose inputs exist, 1 and 2 threads
    python bench/threads.py --recipes dmgan_clip --threads 1 2 --rounds 3

A recipe is skipped, with the command that makes its input, when that input is missing.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# recipe: its short training command (run dir appended), and the input it needs with the
# command that makes it
RECIPES = {
    'dmgan_clip': dict(
        cmd=['main.py', '--cfg', 'cfg/shapes_DMGAN.yml', '--set', 'TRAIN.MAX_EPOCH=1'],
        needs=('output/clip_shapes/checkpoints/text_encoder3.pth', 'pretrain_DAMSM.py --cfg cfg/clip_shapes.yml'),
    ),
    'dmgan_damsm': dict(
        cmd=['main.py', '--cfg', 'cfg/shapes_DMGAN_DAMSM.yml', '--set', 'TRAIN.MAX_EPOCH=1'],
        needs=('output/DAMSM_shapes/checkpoints/text_encoder7.pth', 'pretrain_DAMSM.py --cfg cfg/DAMSM/shapes.yml'),
    ),
    'xmc': dict(
        cmd=['main.py', '--cfg', 'cfg/shapes_xmc.yml', '--set', 'TRAIN.MAX_STEPS=100'],
        needs=('data/shapes/xmc_text', 'preprocess_data.py --cfg cfg/preprocess/shapes_text.yml'),
    ),
    'dalle': dict(
        cmd=[
            'train_dalle.py', '--cfg', 'cfg/dalle/shapes_dalle.yml', '--vae_path',
            'output/shapes_vae/vae.pt', '--set', 'TRAIN.MAX_STEPS=100', '--set', 'EVAL.JUDGE=',
        ],
        needs=('output/shapes_vae/vae.pt', 'train_vae.py --cfg cfg/dalle/shapes_vae.yml'),
    ),
}  # fmt: skip


def seconds_per_step(cmd, threads, workdir):
    """One short training at `threads`; its loop's seconds per step."""
    out = tempfile.mkdtemp(dir=workdir)
    argv = [sys.executable, *cmd, '--out', out, '--overwrite', '--set', f'CPU_THREADS={threads}']
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        tail = (r.stderr.strip().splitlines() or ['(no output)'])[-1]
        sys.exit(f"bench/threads.py: {' '.join(cmd)} failed (exit {r.returncode}): {tail}")
    with open(os.path.join(out, 'metrics.json')) as f:
        m = json.load(f)
    shutil.rmtree(out)  # its checkpoints are not needed
    return m['train_seconds'] / m['train_steps']


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--recipes', nargs='+', choices=sorted(RECIPES), default=sorted(RECIPES))
    p.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--out', default='output/bench/threads.json')
    args = p.parse_args()
    workdir = tempfile.mkdtemp(prefix='t2i-threads-')
    results = {}
    for name in args.recipes:
        recipe = RECIPES[name]
        path, make = recipe['needs']
        if not os.path.exists(os.path.join(ROOT, path)):
            print(f'{name}: skipped, {path} is missing (python {make})', flush=True)
            continue
        times = {t: [] for t in args.threads}
        for _ in range(args.rounds):
            for t in args.threads:
                times[t].append(seconds_per_step(recipe['cmd'], t, workdir))
        med = {t: statistics.median(v) for t, v in times.items()}
        base = med[max(args.threads)]
        results[name] = {
            str(t): {'seconds_per_step': s, 'speedup': base / s} for t, s in med.items()
        }
        print(
            f'{name:12s} '
            + ' | '.join(
                f'{t} thread(s): {1 / s:6.2f} steps/s (x{base / s:.2f})' for t, s in med.items()
            ),
            flush=True,
        )
    summary = {
        'results': results,
        'rounds': args.rounds,
        'cores': os.cpu_count(),
        'load_average': os.getloadavg(),
        'date': time.strftime('%Y-%m-%d %H:%M'),
    }
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(summary, f, indent=1)
    shutil.rmtree(workdir)


if __name__ == '__main__':
    main()
