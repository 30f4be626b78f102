"""The synthetic dataset's attribute judge: its scoring (utils.py: scenes, breakdown, accuracy),
its loss (models.judge_loss), its training and its folder scoring (train_judge.py)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import check_protocol, run_in_process, run_python

import models
import preprocess_data
import train_judge
import utils


# ----------------------------------------------------------------------------
# Its scoring (utils.py)
# ----------------------------------------------------------------------------
def obj(shape, colour, size, cell):
    return {'shape': shape, 'colour': colour, 'size': size, 'cell': cell}


def test_judge_scene_matching_and_position():
    one = {'objects': [obj('circle', 'red', 'small', 4)], 'relation': None}
    assert utils.judge_scene([obj('circle', 'red', 'small', 4)], one)['all']
    s = utils.judge_scene([obj('circle', 'red', 'small', 3)], one)
    assert s['hits'] == [[True, True, True]] and not s['position'] and not s['all']
    s = utils.judge_scene([], one)
    assert not s['count'] and s['hits'] == [[False] * 3] and not s['position']

    A, B = obj('star', 'blue', 'large', 0), obj('cross', 'pink', 'small', 2)
    pair = {'objects': [A, B], 'relation': 'to the left of'}
    assert utils.judge_scene([A, B], pair)['all']
    # other cells, other reading order: still A left of B (column 0 < column 1)
    moved = [dict(B, cell=1), dict(A, cell=6)]
    assert utils.judge_scene(moved, pair)['all']
    swapped = [dict(B, cell=0), dict(A, cell=5)]
    s = utils.judge_scene(swapped, pair)
    assert s['count'] and s['hits'] == [[True] * 3] * 2 and not s['position']
    s = utils.judge_scene([A, B, obj('circle', 'red', 'small', 8)], pair)
    assert not s['count'] and s['hits'] == [[True] * 3] * 2 and not s['position'] and not s['all']
    # objects in every cell: the named ones are found, but no position credit for a crowd
    crowd = [obj('circle', 'red', 'small', c) for c in range(9)]
    s = utils.judge_scene(crowd, one)
    assert s['hits'] == [[True] * 3] and not s['position'] and not s['count']


def test_breakdown_categories_and_reasons():
    """GenEval-style categories and the per-image reason, on hand-built scenes."""
    one = {'objects': [obj('circle', 'red', 'small', 4)], 'relation': None}
    A, B = obj('star', 'blue', 'large', 0), obj('cross', 'pink', 'small', 2)
    pair = {'objects': [A, B], 'relation': 'to the left of'}
    cases = [  # (judged objects, caption), what the breakdown should count
        ([obj('circle', 'red', 'small', 4)], one),  # one object, all right
        ([obj('circle', 'blue', 'small', 4)], one),  # right shape, wrong colour
        ([obj('square', 'red', 'small', 3)], one),  # wrong shape and cell
        ([A, B], pair),  # pair right
        ([A, dict(B, colour='blue')], pair),  # pair: shapes right, B's colour wrong
        ([A], pair),  # one object missing
    ]
    scenes = [utils.judge_scene(p, t) for p, t in cases]
    b = utils.judge_breakdown(scenes, [t for _, t in cases])
    assert b['single_object'] == pytest.approx(2 / 3) and b['colours'] == pytest.approx(1 / 3)
    assert b['two_objects'] == pytest.approx(2 / 3) and b['colour_attribution'] == pytest.approx(
        1 / 3
    )
    assert b['counting'] == pytest.approx(5 / 6) and b['position'] == pytest.approx(4 / 6)
    reasons = [utils.scene_reason(p, t, s) for (p, t), s in zip(cases, scenes)]
    assert reasons[0] == '' and reasons[3] == ''
    assert reasons[1] == 'colour of object 1: the caption says red'
    assert reasons[2] == 'shape of object 1: the caption says circle'
    assert reasons[4] == 'colour of object 2: the caption says pink'
    assert reasons[5] == 'count: the judge sees 1 object(s), the caption names 2'
    assert utils.judge_breakdown(scenes[:3], [one] * 3)['two_objects'] is None


def test_relation_from_cells_agrees_with_the_generator():
    """The named-axis reading of cells holds for every relation sample_scene writes."""
    import random

    rng = random.Random(0)
    for _ in range(3000):
        scene = preprocess_data.sample_scene(rng, p_two=1.0)
        a, b = scene['objects']
        assert utils.relation_holds(scene['relation'], a['cell'], b['cell'])


class Oracle(torch.nn.Module):
    """A judge that reads the image's index from its first pixel and answers the truth."""

    def __init__(self, scenes):
        super().__init__()
        self.targets = torch.stack([utils.cell_targets(s) for s in scenes])
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        t = self.targets[x[:, 0, 0, 0].round().long()]

        def onehot(col, n):
            return torch.nn.functional.one_hot(t[..., col].clamp(min=0), n).float() * 10

        return (t[..., :1].float() * 20 - 10, onehot(1, 6), onehot(2, 8), onehot(3, 2))


def test_judge_accuracy_with_an_oracle(tiny_shapes):
    attrs = utils.caption_attributes(tiny_shapes)
    keys = sorted(attrs)
    judge = Oracle([attrs[k] for k in keys])
    images = torch.arange(float(len(keys)))[:, None, None, None].expand(len(keys), 3, 4, 4)
    acc = utils.judge_accuracy(judge, images, keys, attrs)
    assert acc == {
        **{k: 1.0 for k in ('count', 'shape', 'colour', 'size', 'position', 'all')},
        **{f'breakdown_{k}': 1.0 for k in utils.BREAKDOWN},
    }
    records = []
    wrong = utils.judge_accuracy(judge, images, keys[1:] + keys[:1], attrs, records=records)
    assert wrong['all'] < 0.5 and [r['key'] for r in records] == keys[1:] + keys[:1]
    assert all(r['correct'] == (r['reason'] == '') for r in records) and not all(
        r['correct'] for r in records
    )
    assert {r['category'] for r in records} == {'one object', 'two objects'}
    with pytest.raises(utils.UserError, match='not a key'):
        utils.judge_accuracy(judge, images[:1], ['nope'], attrs)


def test_shapes_key():
    key = '003.red_triangle/red_triangle_00042'
    assert utils.shapes_key(f'data/shapes/CUB_200_2011/images/{key}.jpg') == key
    assert utils.shapes_key(f'out/gen/{key}_s3.png') == key
    with pytest.raises(utils.UserError, match='keys.json'):
        utils.shapes_key('out/gen/0001.png')


# ----------------------------------------------------------------------------
# Its loss (models.py), training and folder scoring (train_judge.py)
# ----------------------------------------------------------------------------
def test_judge_loss_reads_attributes_of_occupied_cells_only(tiny_shapes):
    """Objectness on all 9 cells; shape, colour and size only where an object sits: logits that
    answer every target right give a small loss whatever the empty cells' attribute logits say."""
    attrs = utils.caption_attributes(tiny_shapes)
    targets = torch.stack([utils.cell_targets(attrs[k]) for k in sorted(attrs)[:4]])
    full = targets[..., 0] == 1

    def onehot(col, n):
        return torch.nn.functional.one_hot(targets[..., col].clamp(min=0), n).float() * 30

    occ = (full.float() * 60 - 30)[..., None]
    right = [occ, onehot(1, 6), onehot(2, 8), onehot(3, 2)]
    assert models.judge_loss(right, targets) < 1e-6
    noisy_empty = [x.clone() for x in right]
    for x in noisy_empty[1:]:
        x[~full] = torch.randn_like(x[~full]) * 100
    assert models.judge_loss(noisy_empty, targets) == pytest.approx(
        models.judge_loss(right, targets).item(), abs=1e-6
    )
    wrong = [occ, onehot(1, 6).roll(1, -1), onehot(2, 8), onehot(3, 2)]
    assert models.judge_loss(wrong, targets) > 10


def key_folder(folder, data_dir, keys):
    """Dataset images as PNGs 000.png, 001.png, ... and their keys.json (an image dump's layout)."""
    os.makedirs(folder)
    for i, k in enumerate(keys):
        Image.open(os.path.join(data_dir, 'CUB_200_2011', 'images', k + '.jpg')).save(
            os.path.join(folder, f'{i:03d}.png')
        )
    with open(os.path.join(folder, 'keys.json'), 'w') as f:
        json.dump({f'{i:03d}.png': k for i, k in enumerate(keys)}, f)
    return str(folder)


def test_score_writes_the_accuracy_with_its_protocol(tiny_shapes, tiny_judge, tmp_path, capsys):
    keys = utils.read_attngan_split(tiny_shapes, 'test')
    gen = key_folder(tmp_path / 'gen', tiny_shapes, keys)
    out = tmp_path / 'acc.json'
    run_in_process(
        train_judge, ['--score', gen, '--judge', tiny_judge, '--json', out, '--num_workers', 0]
    )
    acc = json.load(open(out))
    judge = models.load_judge(tiny_judge)
    assert acc['images'] == 20 and 0 <= acc['all'] <= 1
    assert f"all {acc['all']:.4f}" in capsys.readouterr().out
    check_protocol(
        acc['protocol'],
        {'judge': os.path.join(tiny_judge, 'checkpoints', 'judge_final.pt')},
        split=None,
        num_images=20,
        seed=None,
        image_size=32,
        resize=judge.resize,
    )
    with pytest.raises(utils.UserError, match='needs --judge'):
        run_in_process(train_judge, ['--score', gen])


@pytest.mark.slow
def test_train_judge_and_use_it(tiny_shapes, tmp_path):
    out = tmp_path / 'judge'
    p = run_python(
        'train_judge.py',
        '--cfg',
        'cfg/judge_shapes.yml',
        '--out',
        str(out),
        '--set',
        f'DATA_DIR={tiny_shapes}',
        '--set',
        'JUDGE.IMAGE_SIZE=32',
        '--set',
        'JUDGE.WIDTH=8',
        '--set',
        'JUDGE.CELL_DIM=8',
        '--set',
        'TRAIN.EPOCHS=1',
        '--set',
        'TRAIN.BATCH_SIZE=8',
        '--set',
        'TRAIN.WORKERS=0',
    )
    assert p.returncode == 0, p.stderr
    m = json.load(open(out / 'metrics.json'))
    assert m['feature_dim'] == 72 and 0 <= m['heldout_all'] <= 1 and 'wrong_caption_shape' in m
    judge = models.load_judge(str(out))
    assert len(judge.attributes) == 60
    # score a folder of "generated" images named by keys.json, and its shapes FID
    attrs = utils.caption_attributes(tiny_shapes)
    keys = utils.read_attngan_split(tiny_shapes, 'test')
    gen = tmp_path / 'gen'
    key_folder(gen, tiny_shapes, keys)
    p = run_python(
        'train_judge.py',
        '--score',
        str(gen),
        '--judge',
        str(out),
        '--json',
        str(tmp_path / 'acc.json'),
    )
    assert p.returncode == 0, p.stderr
    acc = json.load(open(tmp_path / 'acc.json'))
    images = (
        torch.stack(
            [
                torch.from_numpy(np.array(Image.open(gen / f'{i:03d}.png'))).permute(2, 0, 1)
                for i in range(len(keys))
            ]
        ).float()
        / 127.5
        - 1
    )
    assert acc['images'] == 20 and acc['shape'] == pytest.approx(
        utils.judge_accuracy(judge, images, keys, attrs)['shape']
    )
    check_protocol(acc['protocol'], {'judge': judge.weights_path}, num_images=20, image_size=32)
    p = run_python('fid_score.py', str(gen), str(out / 'test_stats.npz'), '--judge', str(out))
    assert p.returncode == 0, p.stderr
    assert float(p.stdout.split('FID:')[-1]) < 1e-3  # the test images against their own statistics
