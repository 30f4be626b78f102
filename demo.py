"""The embedded demo: every system of this repository, end to end, on the synthetic shapes
dataset, then a report (output/demo/report.md and report.html; the scores only it computes,
the judge on dalle_gen.py's samples, with their protocol in output/demo/metrics.json).

  python demo.py                                   # what `make demo` runs
  DEMO_SCALE=4 python demo.py                      # every training length 4x, in output/demo_x4

Each step is a documented command a user could run alone (printed before it runs; its
output goes to <out>/logs/<step>.log). A step whose marker file exists is skipped, so
re-running resumes after a failure or a kill, losing at most the step in progress; a
failing step stops the demo with its command and the last line it printed.
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
DATA = 'data/shapes'  # preprocess_data.py --cfg cfg/preprocess/shapes.yml
# Training length of each step at DEMO_SCALE 1, sized so the whole demo fits in 15 minutes on 2 CPU
# cores in the slower spells of a shared machine (which ran the same steps up to 1.3x slower than
# its faster ones); the cfgs' own lengths (docs/experiments.md: ~10 minutes each) are the longer runs.
LENGTH = {
    'judge_epochs': 3,
    'clip_epochs': 1,
    'damsm_epochs': 1,
    'dmgan_epochs': 3,
    'xmc_steps': 250,
    'vae_epochs': 1,
    'dalle_steps': 200,
    'dalle_eval_captions': 128,
}
SAMPLES_PER_CAPTION = 8  # dalle_gen.py images per caption, reranked by clip_sort.py


class Step:
    def __init__(self, name, title, cmd, marker):
        self.name, self.title, self.cmd, self.marker = name, title, [str(c) for c in cmd], marker


def steps(out, scale):
    """The pipeline up to the XMC-GAN evaluation; the DALLE steps follow (dalle_steps), as they
    sample the captions that evaluation chose for the sample grid."""

    def n(key):
        return max(1, round(LENGTH[key] * scale))

    def d(*p):
        return os.path.join(out, *p)

    enc = d('clip', 'checkpoints', f"text_encoder{n('clip_epochs')}.pth")
    return [
        Step(
            'data',
            'synthetic dataset (10,000 train / 1,000 test images)',
            [PY, 'preprocess_data.py', '--cfg', 'cfg/preprocess/shapes.yml', '--out', d('data')],
            d('data', 'metrics.json'),
        ),
        Step(
            'judge',
            'attribute judge (metrics: attribute accuracy, shapes FID)',
            [
                PY,
                'train_judge.py',
                '--cfg',
                'cfg/judge_shapes.yml',
                '--out',
                d('judge'),
                '--resume',
                'auto',
                '--set',
                f"TRAIN.EPOCHS={n('judge_epochs')}",
            ],
            d('judge', 'test_stats.npz'),
        ),
        Step(
            'clip',
            'CLIP from scratch (the encoder cfg/shapes_DMGAN.yml conditions on)',
            [
                PY,
                'pretrain_DAMSM.py',
                '--cfg',
                'cfg/clip_shapes.yml',
                '--out',
                d('clip'),
                '--resume',
                'auto',
                '--set',
                f"TRAIN.MAX_EPOCH={n('clip_epochs')}",
            ],
            enc,
        ),
        Step(
            'damsm',
            'DAMSM RNN/CNN encoder (AttnGAN baseline)',
            [
                PY,
                'pretrain_DAMSM.py',
                '--cfg',
                'cfg/DAMSM/shapes.yml',
                '--out',
                d('damsm'),
                '--resume',
                'auto',
                '--set',
                f"TRAIN.MAX_EPOCH={n('damsm_epochs')}",
            ],
            d('damsm', 'checkpoints', f"text_encoder{n('damsm_epochs')}.pth"),
        ),
        Step(
            'dmgan',
            'DM-GAN on the CLIP from scratch',
            [
                PY,
                'main.py',
                '--cfg',
                'cfg/shapes_DMGAN.yml',
                '--out',
                d('dmgan'),
                '--resume',
                'auto',
                '--set',
                f"TRAIN.MAX_EPOCH={n('dmgan_epochs')}",
                '--set',
                f'TRAIN.NET_E={enc}',
                # caching encodes all 80,172 training captions up front; an epoch draws 9,984,
                # so up to 8 epochs encoding each batch is cheaper
                '--set',
                f"TRAIN.CACHE_TEXT_FEATURES={'true' if n('dmgan_epochs') > 8 else 'false'}",
            ],
            d('dmgan', 'metrics.json'),
        ),
        Step(
            'dmgan_eval',
            'DM-GAN evaluation: R-precision, judge, baselines, image dump',
            [
                PY,
                'main.py',
                '--cfg',
                'cfg/eval_shapes_DMGAN.yml',
                '--out',
                d('dmgan_eval'),
                '--set',
                f"TRAIN.NET_G={d('dmgan')}",
                '--set',
                f'TRAIN.NET_E={enc}',
                '--set',
                f"EVAL.JUDGE={d('judge')}",
                '--set',
                'EVAL.NUM_IMAGES=1000',
            ],
            d('dmgan_eval', 'metrics.json'),
        ),
        Step(
            'xmc_embed',
            'caption embeddings for XMC-GAN (the CLIP from scratch)',
            [
                PY,
                'preprocess_data.py',
                '--cfg',
                'cfg/preprocess/shapes_text.yml',
                '--out',
                d('xmc_embed'),
                '--set',
                f'EMBED.ENCODER={enc}',
                '--set',
                f"EMBED.OUT_DIR={d('xmc_text')}",
            ],
            d('xmc_embed', 'metrics.json'),
        ),
        Step(
            'xmc',
            'XMC-GAN',
            [
                PY,
                'main.py',
                '--cfg',
                'cfg/shapes_xmc.yml',
                '--out',
                d('xmc'),
                '--resume',
                'auto',
                '--set',
                f"EMBEDDINGS={d('xmc_text')}",
                '--set',
                f"TRAIN.MAX_STEPS={n('xmc_steps')}",
                '--set',
                f"TRAIN.CHECKPOINT_EVERY={n('xmc_steps')}",
            ],
            d('xmc', 'metrics.json'),
        ),
        Step(
            'xmc_eval',
            'XMC-GAN evaluation of its checkpoint: FID (judge), judge, R-precision, sample grid',
            [
                PY,
                'main.py',
                '--cfg',
                'cfg/eval_shapes_xmc.yml',
                '--out',
                d('xmc_eval'),
                '--set',
                f"EMBEDDINGS={d('xmc_text')}",
                '--set',
                f"EVAL.WORKDIR={d('xmc')}",
                '--set',
                f'EVAL.NET_E={enc}',
                '--set',
                f"EVAL.JUDGE={d('judge')}",
                '--set',
                'EVAL.REPEATS=1',
                '--set',
                f"EVAL.DMGAN={d('dmgan')}",
                '--set',
                'EVAL.SAVE_IMAGES=true',
            ],
            d('xmc_eval', 'metrics.json'),
        ),
        Step(
            'dmgan_fid',
            'shapes FID of the DM-GAN images (fid_score.py, judge features)',
            [
                PY,
                'fid_score.py',
                d('dmgan_eval', 'valid', 'single'),
                d('judge', 'test_stats.npz'),
                '--judge',
                d('judge'),
                '--json',
                d('dmgan_eval', 'fid.json'),
            ],
            d('dmgan_eval', 'fid.json'),
        ),
        Step(
            'vae',
            'discrete VAE (DALLE image tokens)',
            [
                PY,
                'train_vae.py',
                '--cfg',
                'cfg/dalle/shapes_vae.yml',
                '--out',
                d('vae'),
                '--resume',
                'auto',
                '--set',
                f"TRAIN.EPOCHS={n('vae_epochs')}",
                '--set',
                f"EVAL.JUDGE={d('judge')}",
            ],
            d('vae', 'metrics.json'),
        ),
        Step(
            'dalle',
            'DALLE on the VAE',
            [
                PY,
                'train_dalle.py',
                '--cfg',
                'cfg/dalle/shapes_dalle.yml',
                '--out',
                d('dalle'),
                '--resume',
                'auto',
                '--vae_path',
                d('vae', 'vae.pt'),
                '--set',
                f"TRAIN.MAX_STEPS={n('dalle_steps')}",
                '--set',
                f"EVAL.JUDGE={d('judge')}",
                '--set',
                f'EVAL.ENCODER={enc}',
                '--set',
                f"EVAL.NUM_CAPTIONS={LENGTH['dalle_eval_captions']}",
            ],
            d('dalle', 'metrics.json'),
        ),
    ]


def latest_samples(out, ext):
    """The newest sample grid file (.png) or its captions (.json) of the XMC-GAN evaluation."""
    names = sorted(
        f
        for f in os.listdir(os.path.join(out, 'xmc_eval'))
        if f.startswith('samples_') and f.endswith(ext)
    )
    return os.path.join(out, 'xmc_eval', names[-1])


def grid_captions(out):
    """The captions (and image keys) of the XMC-GAN evaluation's sample grid."""
    with open(latest_samples(out, '.json')) as f:
        return json.load(f)


def dalle_steps(out, encoder):
    """dalle_gen.py and clip_sort.py on the grid's captions, all in one call each ('|'-separated
    captions; caption i in dalle_gen/<i>)."""

    def d(*p):
        return os.path.join(out, *p)

    rows = grid_captions(out)
    text, path = ' | '.join(r['caption'] for r in rows), d('dalle_gen')
    return [
        Step(
            'dalle_gen',
            f'dalle_gen.py: {SAMPLES_PER_CAPTION} samples for each of the {len(rows)} grid captions',
            [
                PY,
                'dalle_gen.py',
                text,
                SAMPLES_PER_CAPTION,
                path,
                '--cfg',
                'cfg/dalle/shapes_gen.yml',
                '--dalle_path',
                d('dalle', 'checkpoints', 'shapes_dalle.pt'),
                '--seed',
                0,
            ],
            os.path.join(path, 'metrics.json'),
        ),
        Step(
            'clip_sort',
            'clip_sort.py: rerank them with the CLIP from scratch',
            [
                PY,
                'clip_sort.py',
                text,
                SAMPLES_PER_CAPTION,
                path,
                '--cfg',
                'cfg/dalle/shapes_sort.yml',
                '--clip_path',
                encoder,
                '--out',
                d('clip_sort'),
            ],
            d('clip_sort', 'metrics.json'),
        ),
    ]


def run_step(step, i, total, log_dir):
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f'{step.name}.log')
    line = ' '.join(shlex.quote(c) for c in step.cmd)
    print(f'\n[{i}/{total}] {step.name}: {step.title}\n  $ {line}', flush=True)
    t0 = time.time()
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(
            step.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        last = ''
        for out_line in proc.stdout:
            log.write(out_line)
            if out_line.strip():
                last = out_line.strip()
                print(f'  {last[-160:]}', flush=True)
        proc.wait()
    if proc.returncode != 0 or not os.path.isfile(step.marker):
        cause = last or f'exit status {proc.returncode}'
        sys.exit(f'demo: step "{step.name}" failed: {cause}\n  command: {line}\n  log: {log_path}')
    print(f'[{i}/{total}] {step.name} done in {time.time() - t0:.0f}s', flush=True)
    return time.time() - t0


def run_all(todo, times, out, offset, total):
    path = os.path.join(out, 'step_times.json')
    for i, step in enumerate(todo, offset + 1):
        if os.path.isfile(step.marker):
            print(f'[{i}/{total}] {step.name}: done already ({step.marker})', flush=True)
            continue
        times[step.name] = round(run_step(step, i, total, os.path.join(out, 'logs')), 1)
        with open(path + '.tmp', 'w') as f:
            json.dump(times, f, indent=1)
        os.replace(path + '.tmp', path)


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------


def load(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def dalle_scores(out, rows):
    """The judge on DALLE's images read back from dalle_gen.py's files, as `train_judge.py
    --score` reads them, through the evaluation path every generator takes: every sample
    (what one random draw gets) and each caption's top-1 after clip_sort.py, each with its
    protocol in <out>/metrics.json; also each caption's first sample and top-1 for the grid."""
    import torch
    import models
    import utils

    judge = models.load_judge(os.path.join(out, 'judge'))
    samples, best = [], []
    for i, row in enumerate(rows):
        path = os.path.join(out, 'dalle_gen', str(i))
        top1 = load(os.path.join(path, 'ranking.json'))['ranking'][0]['file']
        best.append(len(samples) + int(os.path.splitext(os.path.basename(top1))[0]))
        samples += [
            {
                'key': row['key'],
                'caption': row['caption'],
                'class': row['key'].split('/')[0],
                'file': os.path.join(path, f'{j}.png'),
            }
            for j in range(SAMPLES_PER_CAPTION)
        ]
    top = [samples[j] for j in best]

    def read(records):
        return torch.cat(list(utils.batches([r['file'] for r in records], 64, 0, 'cpu'))) * 2 - 1

    weights = {
        'judge': judge.weights_path,
        'dalle': os.path.join(out, 'dalle', 'checkpoints', 'shapes_dalle.pt'),
    }
    size = utils.load_image(samples[0]['file']).size[0]
    seed = utils.load_yaml(os.path.join(out, 'dalle_gen', 'cfg.yml'))['SEED']  # dalle_gen.py's
    before, after = (
        utils.evaluate_generator(
            read,
            records,
            [utils.JudgeAccuracy(judge, store='float')],
            64,
            'test',
            seed,
            weights,
            size,
        )
        for records in (samples, top)
    )
    utils.write_metrics(out, {'dalle_samples': before, 'dalle_clip_top1': after})
    return before, after, read(samples[::SAMPLES_PER_CAPTION]), read(top)


def write_grid(out, rows, dalle_first, dalle_top):
    """grid.png: one column per caption; rows real, XMC-GAN, DM-GAN (the XMC-GAN evaluation's
    sample grid), then DALLE's first sample and its CLIP top-1."""
    import torch
    import torchvision.utils as vutils
    import torchvision.transforms.functional as TF
    import utils

    top = TF.to_tensor(utils.load_image(latest_samples(out, '.png')))
    tile = (top.shape[-1] - 2) // len(rows) - 2
    dalle = torch.nn.functional.interpolate(
        torch.cat([dalle_first, dalle_top]), size=(tile, tile), mode='bilinear', align_corners=False
    )
    bottom = vutils.make_grid((dalle.clamp(-1, 1) + 1) / 2, nrow=len(rows), padding=2)
    vutils.save_image(torch.cat([top[:, :-2], bottom], 1), os.path.join(out, 'grid.png'))


def write_report(out, times, scale, total_s):
    rows = grid_captions(out)
    before, after, dalle_first, dalle_top = dalle_scores(out, rows)
    write_grid(out, rows, dalle_first, dalle_top)
    dm, dm_fid = (
        load(os.path.join(out, 'dmgan_eval', 'metrics.json')),
        load(os.path.join(out, 'dmgan_eval', 'fid.json')),
    )
    xm = load(os.path.join(out, 'xmc_eval', 'metrics.json'))
    xl, xu = xm.get(f"eval/{xm.get('latest')}", {}), xm.get('untrained', {})
    clip, damsm = (
        load(os.path.join(out, 'clip', 'metrics.json')),
        load(os.path.join(out, 'damsm', 'metrics.json')),
    )
    vae, dl = (
        load(os.path.join(out, 'vae', 'metrics.json')),
        load(os.path.join(out, 'dalle', 'metrics.json')),
    )

    def f(v):
        return '–' if v is None else (f'{v:.3f}' if isinstance(v, float) else str(v))

    def t(*names):
        return f'{sum(times.get(n, 0) for n in names):.0f} s'

    head = [
        'system',
        'R-precision',
        'judge: all',
        'colour',
        'shape',
        'position',
        'shapes FID',
        'training time',
    ]
    table = [
        [
            'real test images, their own caption',
            '–',
            dm.get('real_judge_all'),
            dm.get('real_judge_colour'),
            dm.get('real_judge_shape'),
            dm.get('real_judge_position'),
            '0',
            '–',
        ],
        [
            'real test images, a wrong caption',
            '–',
            dm.get('wrong_caption_judge_all'),
            dm.get('wrong_caption_judge_colour'),
            dm.get('wrong_caption_judge_shape'),
            dm.get('wrong_caption_judge_position'),
            '–',
            '–',
        ],
        [
            'DM-GAN (CLIP from scratch)',
            dm.get('r_precision'),
            dm.get('judge_all'),
            dm.get('judge_colour'),
            dm.get('judge_shape'),
            dm.get('judge_position'),
            dm_fid.get('fid'),
            t('dmgan'),
        ],
        [
            'DM-GAN, untrained',
            dm.get('untrained_r_precision'),
            dm.get('untrained_judge_all'),
            dm.get('untrained_judge_colour'),
            dm.get('untrained_judge_shape'),
            dm.get('untrained_judge_position'),
            '–',
            '–',
        ],
        [
            'XMC-GAN',
            xl.get('r_precision'),
            xl.get('judge_all'),
            xl.get('judge_colour'),
            xl.get('judge_shape'),
            xl.get('judge_position'),
            xl.get('fid'),
            t('xmc_embed', 'xmc'),
        ],
        [
            'XMC-GAN, untrained',
            xu.get('r_precision'),
            xu.get('judge_all'),
            xu.get('judge_colour'),
            xu.get('judge_shape'),
            xu.get('judge_position'),
            xu.get('fid'),
            '–',
        ],
        [
            f"DALLE, one sample per caption ({dl.get('eval_captions', 0)} captions)",
            dl.get('r_precision'),
            dl.get('judge_all'),
            dl.get('judge_colour'),
            dl.get('judge_shape'),
            dl.get('judge_position'),
            '–',
            t('vae', 'dalle'),
        ],
        [
            f"DALLE, the CLIP's top-1 of {dl.get('rerank_samples', '–')} per caption (the same captions)",
            dl.get('rerank_r_precision'),
            dl.get('rerank_judge_all'),
            dl.get('rerank_judge_colour'),
            dl.get('rerank_judge_shape'),
            dl.get('rerank_judge_position'),
            '–',
            '–',
        ],
        [
            'DALLE, the same samples against shuffled captions',
            '–',
            dl.get('shuffled_judge_all'),
            dl.get('shuffled_judge_colour'),
            dl.get('shuffled_judge_shape'),
            dl.get('shuffled_judge_position'),
            '–',
            '–',
        ],
        [
            'DALLE, untrained',
            dl.get('untrained_r_precision'),
            dl.get('untrained_judge_all'),
            dl.get('untrained_judge_colour'),
            dl.get('untrained_judge_shape'),
            dl.get('untrained_judge_position'),
            '–',
            '–',
        ],
        [
            f'DALLE, all {SAMPLES_PER_CAPTION} samples of the {len(rows)} grid captions',
            '–',
            before['judge_all'],
            before['judge_colour'],
            before['judge_shape'],
            before['judge_position'],
            '–',
            '–',
        ],
        [
            f'DALLE, CLIP top-1 of {SAMPLES_PER_CAPTION} (clip_sort.py)',
            '–',
            after['judge_all'],
            after['judge_colour'],
            after['judge_shape'],
            after['judge_position'],
            '–',
            '–',
        ],
    ]
    enc = [
        ['CLIP from scratch (open_clip loss)', clip.get('R_precision'), t('clip')],
        ['DAMSM RNN/CNN encoder', damsm.get('R_precision'), t('damsm')],
    ]
    md = [
        '# t2i-repro embedded demo',
        '',
        f"{time.strftime('%Y-%m-%d')}, DEMO_SCALE {scale}, {os.cpu_count()} CPU cores; total {total_s:.0f} s "
        f"(this invocation; per-step times in step_times.json).",
        '',
        'Generators, on the test captions (judge = attribute accuracy of the shapes judge; R-precision '
        '= 1 true + 99 captions of other classes, chance 0.01; shapes FID = Fréchet distance on the '
        "judge's features against the 1,000 real test images):",
        '',
        '| ' + ' | '.join(head) + ' |',
        '|' + '---|' * len(head),
    ]
    md += [
        '| ' + ' | '.join(f(v) if not isinstance(v, str) else v for v in r) + ' |' for r in table
    ]
    md += [
        '',
        'Encoders (R-precision of real test images, chance 0.01):',
        '',
        '| encoder | R-precision | training time |',
        '|---|---|---|',
    ] + ['| ' + ' | '.join(f(v) if not isinstance(v, str) else v for v in r) + ' |' for r in enc]
    if vae:
        md += [
            '',
            f"Discrete VAE: the judge's colour accuracy on reconstructions "
            f"{f(vae.get('judge_recon_colour'))} vs originals {f(vae.get('judge_original_colour'))}; shape "
            f"{f(vae.get('judge_recon_shape'))} vs {f(vae.get('judge_original_shape'))}.",
        ]
    md += [
        '',
        'Inception Score: not computed (it needs the FID Inception weights, which cannot be fetched here; '
        '`inception_score.py --path <images>` computes it where the file is present).',
        '',
        '![samples](grid.png)',
        '',
        'Columns: the captions below. Rows: the real test image, XMC-GAN, DM-GAN, DALLE (first sample), '
        'DALLE (CLIP top-1 of 8).',
        '',
    ]
    md += [f'{i + 1}. {r["caption"]}' for i, r in enumerate(rows)]
    with open(os.path.join(out, 'report.md'), 'w') as fh:
        fh.write('\n'.join(md) + '\n')
    grid = base64.b64encode(open(os.path.join(out, 'grid.png'), 'rb').read()).decode()
    html = [
        '<!doctype html><html><head><meta charset="utf-8"><title>t2i-repro demo</title>',
        '<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{border:1px solid #ccc;'
        'padding:3px 8px}table{border-collapse:collapse}</style></head><body>',
        f'<h1>{md[0][2:]}</h1>',
        f'<p>{md[2]}</p>',
    ]
    html += [
        f'<p>{md[4]}</p>',
        table_html(head, table, f),
        '<p>Encoders (R-precision of real test images):</p>',
        table_html(['encoder', 'R-precision', 'training time'], enc, f),
    ]
    html += [
        f'<p>{line}</p>' for line in md if line.startswith(('Discrete VAE', 'Inception Score'))
    ]
    html += (
        [
            f'<img src="data:image/png;base64,{grid}" style="image-rendering:pixelated;width:100%">',
            '<p>Columns: the captions below. Rows: the real test image, XMC-GAN, DM-GAN, DALLE (first sample), '
            'DALLE (CLIP top-1 of 8).</p><ol>',
        ]
        + [f'<li>{r["caption"]}</li>' for r in rows]
        + ['</ol></body></html>']
    )
    with open(os.path.join(out, 'report.html'), 'w') as fh:
        fh.write('\n'.join(html))


def table_html(head, rows, f):
    def cells(r, tag):
        return ''.join(f'<{tag}>{f(v) if not isinstance(v, str) else v}</{tag}>' for v in r)

    return (
        '<table><tr>'
        + cells(head, 'th')
        + '</tr>'
        + ''.join(f'<tr>{cells(r, "td")}</tr>' for r in rows)
        + '</table>'
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', help='default output/demo, output/demo_x<scale> at another scale')
    ap.add_argument(
        '--scale',
        type=float,
        default=float(os.environ.get('DEMO_SCALE', '1')),
        help='multiplies every training length (env DEMO_SCALE)',
    )
    args = ap.parse_args()
    if args.scale <= 0:
        sys.exit(f'demo: --scale/DEMO_SCALE={args.scale}: expected a positive number')
    # another scale gets its own run dir: the markers of a run at one scale say nothing of another
    args.out = args.out or ('output/demo' if args.scale == 1 else f'output/demo_x{args.scale:g}')
    os.makedirs(args.out, exist_ok=True)
    times = load(os.path.join(args.out, 'step_times.json'))
    t0 = time.time()
    first = steps(args.out, args.scale)
    total = len(first) + 2 + 1  # + dalle_gen, clip_sort, the report
    run_all(first, times, args.out, 0, total)
    rest = dalle_steps(args.out, next(s.marker for s in first if s.name == 'clip'))
    run_all(rest, times, args.out, len(first), total)
    print(f'\n[{total}/{total}] report', flush=True)
    write_report(args.out, times, args.scale, time.time() - t0)
    print(f'demo finished in {time.time() - t0:.0f}s; report: {args.out}/report.md and report.html')


if __name__ == '__main__':
    main()
