"""Time the whole embedded demo from scratch against its 15-minute budget (`make demo`).

    python bench/demo.py                    # DEMO_SCALE 1 into output/bench_demo (deleted first)
    python bench/demo.py --scale 2 --keep   # a longer run; --keep leaves an existing run to resume

Runs demo.py as `make demo` does (the synthetic dataset in data/shapes is reused when present,
as the demo's data step regenerates it identically) and prints each step's wall time, the
total, and the total as a share of the budget; the machine and date go with the numbers into
<out>/bench.json.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 15 * 60


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='output/bench_demo')
    p.add_argument('--scale', type=float, default=1.0)
    p.add_argument('--keep', action='store_true', help='do not delete an existing run first')
    args = p.parse_args()
    out = os.path.join(ROOT, args.out)
    if os.path.isdir(out) and not args.keep:
        shutil.rmtree(out)
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, 'demo.py', '--out', out, '--scale', str(args.scale)], cwd=ROOT
    )
    total = time.time() - t0
    if r.returncode:
        sys.exit(f'bench/demo.py: the demo failed (exit {r.returncode}); see {out}/logs')
    with open(os.path.join(out, 'step_times.json')) as f:
        steps = json.load(f)
    for name, s in steps.items():
        print(f'{name:16s} {s:7.1f} s')
    print(
        f'total {total:.0f} s = {total / 60:.1f} min; budget {BUDGET_S / 60:.0f} min at DEMO_SCALE 1: '
        f'{100 * total / BUDGET_S:.0f}% of it'
    )
    with open(os.path.join(out, 'bench.json'), 'w') as f:
        json.dump(
            {
                'total_s': round(total, 1),
                'steps_s': steps,
                'scale': args.scale,
                'budget_s': BUDGET_S,
                'cpus': os.cpu_count(),
                'machine': platform.processor() or platform.machine(),
                'date': time.strftime('%Y-%m-%d %H:%M'),
            },
            f,
            indent=1,
        )


if __name__ == '__main__':
    main()
