"""demo.py's runner: finished steps are skipped on a re-run, a failing step stops the demo
with its command and last line, and the pipeline's commands parse with the real cfgs; the
report's own scores go to metrics.json with their protocol."""

import json
import os
import shutil
import sys

import pytest
from PIL import Image

from conftest import check_protocol

import demo
import utils


def touch_step(name, marker, fail=False):
    code = (
        f"print('working on {name}'); import sys; sys.exit('{name}: bad input, expected X')"
        if fail
        else f"print('working on {name}'); open({str(marker)!r}, 'w').write('ok')"
    )
    return demo.Step(name, name, [sys.executable, '-c', code], str(marker))


def test_failing_step_stops_with_its_command_and_cause_then_rerun_resumes(tmp_path, capsys):
    a, b = touch_step('a', tmp_path / 'a.done'), touch_step('b', tmp_path / 'b.done', fail=True)
    times = {}
    with pytest.raises(SystemExit) as e:
        demo.run_all([a, b], times, str(tmp_path), 0, 2)
    msg = str(e.value)
    assert (
        'step "b" failed: b: bad input, expected X' in msg
        and 'command:' in msg
        and sys.executable in msg
    )
    assert set(json.load(open(tmp_path / 'step_times.json'))) == {'a'}
    assert (tmp_path / 'logs' / 'b.log').read_text().startswith('working on b')
    # the re-run skips a (its marker exists) and runs b again, which now succeeds
    b_ok = touch_step('b', tmp_path / 'b.done')
    os.remove(tmp_path / 'logs' / 'a.log')
    demo.run_all([a, b_ok], times, str(tmp_path), 0, 2)
    assert not (tmp_path / 'logs' / 'a.log').exists() and (tmp_path / 'b.done').is_file()
    assert 'a: done already' in capsys.readouterr().out


def test_a_step_that_exits_0_without_its_marker_is_a_failure(tmp_path):
    s = demo.Step(
        'c', 'c', [sys.executable, '-c', "print('no marker written')"], str(tmp_path / 'c.done')
    )
    with pytest.raises(SystemExit, match='no marker written'):
        demo.run_all([s], {}, str(tmp_path), 0, 1)


@pytest.mark.parametrize('scale', [1.0, 4.0])
def test_every_step_names_a_real_cfg_and_valid_overrides(tmp_path, scale):
    """Each --cfg/--set of the pipeline merges into its script's defaults (no unknown key)."""
    import main
    import preprocess_data
    import pretrain_DAMSM
    import train_dalle
    import train_judge
    import train_vae
    import xmc_gan

    defaults = {
        'preprocess_data.py': preprocess_data.DEFAULTS,
        'train_judge.py': train_judge.DEFAULTS,
        'pretrain_DAMSM.py': pretrain_DAMSM.DEFAULTS,
        'train_vae.py': train_vae.DEFAULTS,
        'train_dalle.py': train_dalle.DEFAULTS,
    }
    checked = 0
    for step in demo.steps(str(tmp_path), scale):
        argv = step.cmd[2:]
        if '--cfg' not in argv:
            continue
        cfg_path = argv[argv.index('--cfg') + 1]
        script = step.cmd[1]
        d = defaults.get(script) or (
            xmc_gan.DEFAULTS
            if utils.load_yaml(cfg_path).get('MODEL') == 'XMCGAN'
            else main.DEFAULTS
        )
        cfg = utils.merge_cfg(
            utils.to_cfg({**utils.COMMON_DEFAULTS, **d}), utils.load_yaml(cfg_path), cfg_path
        )
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == '--set']
        utils.apply_set(cfg, sets)
        checked += 1
    assert checked >= 10


def test_dalle_scores_go_to_metrics_json_with_their_protocol(tiny_shapes, tiny_judge, tmp_path):
    """The judge on dalle_gen.py's files for two captions (here: real test images), every sample
    and the clip_sort.py top-1, each with the seed dalle_gen.py ran with and the files used."""
    out = tmp_path / 'demo'
    shutil.copytree(tiny_judge, out / 'judge')
    keys = utils.read_attngan_split(tiny_shapes, 'test')[:2]
    rows = [{'key': k, 'caption': f'caption {i}'} for i, k in enumerate(keys)]
    for i, k in enumerate(keys):
        folder = out / 'dalle_gen' / str(i)
        os.makedirs(folder)
        image = Image.open(os.path.join(tiny_shapes, 'CUB_200_2011', 'images', k + '.jpg'))
        for j in range(demo.SAMPLES_PER_CAPTION):
            image.save(folder / f'{j}.png')
        ranking = {'ranking': [{'file': str(folder / '3.png')}]}
        (folder / 'ranking.json').write_text(json.dumps(ranking))
    (out / 'dalle_gen' / 'cfg.yml').write_text('SEED: 7\n')
    dalle = out / 'dalle' / 'checkpoints' / 'shapes_dalle.pt'
    os.makedirs(dalle.parent)
    dalle.write_bytes(b'stand-in weights')
    before, after, _, _ = demo.dalle_scores(str(out), rows)
    m = json.load(open(out / 'metrics.json'))
    assert m['dalle_samples']['judge_all'] == before['judge_all']
    assert m['dalle_clip_top1']['judge_all'] == after['judge_all']
    weights = {
        'judge': os.path.join(out, 'judge', 'checkpoints', 'judge_final.pt'),
        'dalle': dalle,
    }
    for name, n in (('dalle_samples', 2 * demo.SAMPLES_PER_CAPTION), ('dalle_clip_top1', 2)):
        check_protocol(
            m[name]['protocol'], weights, split='test', num_images=n, seed=7, image_size=32
        )
