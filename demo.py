"""The embedded demo: every system of the mission, end to end, on the synthetic
shapes dataset, then a report (output/demo/report.md and report.html).

  python demo.py            # what `make demo` runs
  DEMO_SCALE=4 python demo.py --out output/demo_x4   # every step scaled up (longer, better)

Each step is a documented command a user can run alone. A step whose outputs are
complete is skipped, so re-running resumes after a failure or a kill; a failing step
stops the demo with its command and the last line it printed.
"""
import argparse
import base64
import json
import os
import shlex
import subprocess
import sys
import time

PY = sys.executable


def scaled(n, scale):
    return max(1, int(round(n * scale)))


def steps(out, scale):
    """(name, title, command, marker file proving the step finished)."""
    S = lambda n: scaled(n, scale)                       # noqa: E731
    d = lambda *p: os.path.join(out, *p)                 # noqa: E731
    enc = d('clip_shapes', 'Model')
    return [
        ('data', 'synthetic dataset',
         [PY, 'preprocess_data.py', '--cfg', 'cfg/preprocess/shapes.yml', '--out', d('data')],
         d('data', 'metrics.json')),
        ('judge', 'attribute judge',
         [PY, 'fid_score.py', '--train_judge', '--cfg', 'cfg/judge_shapes.yml', '--out', d('judge'),
          '--set', f'TRAIN.EPOCHS={S(3)}'],
         d('judge', 'metrics.json')),
        ('clip', 'CLIP-style encoder (DAMSM + contrastive)',
         [PY, 'pretrain_DAMSM.py', '--cfg', 'cfg/DAMSM/clip_shapes.yml', '--out', d('clip_shapes'),
          '--set', f'TRAIN.MAX_EPOCH={S(4)}'],
         d('clip_shapes', 'metrics.json')),
        ('damsm', 'DAMSM RNN/CNN baseline encoder',
         [PY, 'pretrain_DAMSM.py', '--cfg', 'cfg/DAMSM/shapes.yml', '--out', d('damsm_shapes'),
          '--set', f'TRAIN.MAX_EPOCH={S(2)}'],
         d('damsm_shapes', 'metrics.json')),
        ('dmgan', 'DM-GAN on the CLIP-style encoder',
         [PY, 'main.py', '--cfg', 'cfg/shapes_DMGAN.yml', '--out', d('dmgan'),
          '--set', f'TRAIN.MAX_EPOCH={S(4)}', '--set', f'TRAIN.NET_E={enc}/text_encoder_final.pth'],
         d('dmgan', 'metrics.json')),
        ('dmgan_eval', 'DM-GAN evaluation',
         [PY, 'main.py', '--cfg', 'cfg/eval_shapes_DMGAN.yml', '--out', d('dmgan_eval'),
          '--set', f'TRAIN.NET_G={d("dmgan")}', '--set', f'TRAIN.NET_E={enc}/text_encoder_final.pth',
          '--set', f'EVAL.JUDGE={d("judge")}'],
         d('dmgan_eval', 'metrics.json')),
    ]


def run_step(name, title, cmd, marker, log_dir):
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f'{name}.log')
    line = ' '.join(shlex.quote(c) for c in cmd)
    print(f'[{name}] {title}\n  $ {line}', flush=True)
    t0 = time.time()
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        last = ''
        for out_line in proc.stdout:
            log.write(out_line)
            if out_line.strip():
                last = out_line.strip()
                print(f'  {last[-150:]}', flush=True)
        proc.wait()
    if proc.returncode != 0 or not os.path.isfile(marker):
        cause = last or f'exit status {proc.returncode}'
        sys.exit(f'demo: step "{name}" failed: {cause}\n  command: {line}\n  log: {log_path}')
    return time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default='output/demo')
    ap.add_argument('--scale', type=float, default=float(os.environ.get('DEMO_SCALE', '1')))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    times_path = os.path.join(args.out, 'step_times.json')
    times = json.load(open(times_path)) if os.path.isfile(times_path) else {}
    t0 = time.time()
    todo = steps(args.out, args.scale)
    for i, (name, title, cmd, marker) in enumerate(todo, 1):
        print(f'=== step {i}/{len(todo)} ===', flush=True)
        if os.path.isfile(marker):
            print(f'[{name}] done already ({marker}); skipping', flush=True)
            continue
        times[name] = round(run_step(name, title, cmd, marker, os.path.join(args.out, 'logs')), 1)
        with open(times_path, 'w') as f:
            json.dump(times, f, indent=1)
    write_report(args.out, times, args.scale)
    print(f'demo finished in {time.time() - t0:.0f}s (steps: {times}); report: {args.out}/report.md')


def load_metrics(out, name):
    p = os.path.join(out, name, 'metrics.json')
    return json.load(open(p)) if os.path.isfile(p) else {}


def write_report(out, times, scale):
    """report.md and a one-page report.html with the grid inlined."""
    rows = []
    for sysname, m in (('DM-GAN', load_metrics(out, 'dmgan_eval')),):
        rows.append((sysname, m.get('r_precision'), m.get('untrained_r_precision'),
                     m.get('judge_attribute_accuracy'), m.get('untrained_judge_attribute_accuracy')))
    fmt = lambda v: '–' if v is None else (f'{v:.3f}' if isinstance(v, float) else str(v))  # noqa: E731
    md = [f'# t2i-repro embedded demo\n', f'DEMO_SCALE {scale}; step times (s): {json.dumps(times)}\n',
          '| system | R-precision | untrained R-precision | judge attribute acc. | untrained judge acc. |',
          '|---|---|---|---|---|']
    md += [f'| {r[0]} | ' + ' | '.join(fmt(v) for v in r[1:]) + ' |' for r in rows]
    with open(os.path.join(out, 'report.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    html = ['<html><head><meta charset="utf-8"><title>t2i-repro demo</title></head><body>',
            '<h1>t2i-repro embedded demo</h1>', '<table border=1><tr><th>system</th><th>R-precision</th>'
            '<th>untrained R-precision</th><th>judge acc.</th><th>untrained judge acc.</th></tr>']
    html += ['<tr>' + ''.join(f'<td>{fmt(v)}</td>' for v in r) + '</tr>' for r in rows]
    html.append('</table>')
    grid = os.path.join(out, 'grid.png')
    if os.path.isfile(grid):
        html.append('<img src="data:image/png;base64,' + base64.b64encode(open(grid, 'rb').read()).decode() + '">')
    html.append('</body></html>')
    with open(os.path.join(out, 'report.html'), 'w') as f:
        f.write('\n'.join(html))


if __name__ == '__main__':
    main()
