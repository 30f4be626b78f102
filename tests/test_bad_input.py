"""Bad input, as a user gives it on the command line: each case exits non-zero with one line on
stderr naming the file, key or value, no traceback, and leaves its inputs and earlier outputs
as they were."""

import hashlib
import os

import pytest
import torch
from conftest import ROOT, run_python


def cli(script, *args, cwd=ROOT):
    return run_python(os.path.join(ROOT, script), *args, cwd=cwd, timeout=300)


def digest(folder):
    """sha256 of every file below folder (names and bytes): what 'untouched' means."""
    h = hashlib.sha256()
    for base, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            p = os.path.join(base, f)
            h.update(os.path.relpath(p, folder).encode())
            with open(p, 'rb') as fh:
                h.update(fh.read())
    return h.hexdigest()


def assert_one_line(r, *needles):
    assert r.returncode != 0, r.stdout + r.stderr
    assert 'Traceback' not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('error: '), r.stderr
    for n in needles:
        assert n in last, last


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / 'in'
    d.mkdir()
    (d / 'empty.jsonl').write_text('')
    (d / 'header.csv').write_text('filepath\ttitle\n')
    (d / 'nocaption.csv').write_text('filepath\ttitle\nimages/a.jpg\t\n')
    (d / 'corrupt_vae.pt').write_bytes(os.urandom(2048))
    (d / 'a_file').write_text('not a folder\n')
    return d


CASES = {
    'empty jsonl': (
        ['train_dalle.py', '--image_text_folder', '{in}/empty.jsonl'],
        ['empty.jsonl', 'no (image, caption) pairs'],
    ),
    'header-only csv': (
        ['train_dalle.py', '--image_text_folder', '{in}/header.csv'],
        ['header.csv', 'no (image, caption) pairs'],
    ),
    'csv row without caption': (
        ['train_dalle.py', '--image_text_folder', '{in}/nocaption.csv'],
        ['nocaption.csv:2', 'without a caption'],
    ),
    'corrupt --vae_path': (
        [
            'train_dalle.py',
            '--image_text_folder',
            '{data}/train.jsonl',
            '--vae_path',
            '{in}/corrupt_vae.pt',
        ],
        ['corrupt_vae.pt', 'not a readable'],
    ),
    'top_k -1': (['dalle_gen.py', 'a red circle', '2', '{tmp}/gen', '--top_k', '-1'], ['TOP_K=-1']),
    'inception --splits 0': (
        ['inception_score.py', '--path', '{data}', '--splits', '0'],
        ['--splits 0'],
    ),
    'batch size 0': (
        ['train_vae.py', '--image_folder', '{data}', '--batch_size', '0'],
        ['BATCH_SIZE=0', 'at least 1'],
    ),
    'learning rate nan': (
        ['train_vae.py', '--image_folder', '{data}', '--set', 'TRAIN.LEARNING_RATE=.nan'],
        ['LEARNING_RATE=nan'],
    ),
    'output path is a file': (
        ['train_vae.py', '--image_folder', '{data}', '--out', '{in}/a_file'],
        ['a_file', 'not a directory'],
    ),
    'output path below a file': (
        ['train_vae.py', '--image_folder', '{data}', '--out', '{in}/a_file/run'],
        ['a_file/run', 'cannot write'],
    ),
    # sysfs refuses new entries even to root, for whom a chmod 0o555 folder stays writable
    'output dir not writable': (
        ['train_vae.py', '--image_folder', '{data}', '--out', '/sys/t2i-run'],
        ['/sys/t2i-run', 'cannot write'],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_one_line_and_touches_nothing(case, inputs, tiny_shapes, tmp_path):
    argv, needles = CASES[case]
    fill = {'in': inputs, 'data': tiny_shapes, 'tmp': tmp_path}
    argv = [a.format(**fill) for a in argv]
    if '--out' not in argv:
        argv += (
            ['--out', str(tmp_path / 'run')]
            if argv[0] not in ('dalle_gen.py', 'inception_score.py')
            else []
        )
    before = digest(inputs), digest(tiny_shapes)
    r = cli(*argv)
    assert_one_line(r, *needles)
    assert (digest(inputs), digest(tiny_shapes)) == before


@pytest.mark.slow
def test_resume_after_an_architecture_change_is_one_line(tiny_shapes, tmp_path):
    run = tmp_path / 'vae'
    common = [
        '--image_folder',
        tiny_shapes,
        '--out',
        run,
        '--image_size',
        16,
        '--num_layers',
        1,
        '--num_tokens',
        16,
        '--emb_dim',
        8,
        '--epochs',
        1,
        '--batch_size',
        8,
        '--set',
        'WORKERS=0',
        '--set',
        'TRAIN.AMP=false',
    ]
    r = cli('train_vae.py', *common, '--hidden_dim', 8)
    assert r.returncode == 0, r.stderr
    before = digest(run / 'checkpoints')
    r = cli('train_vae.py', *common, '--hidden_dim', 16, '--resume', 'auto')
    assert_one_line(r, "checkpoint's 'vae' does not fit the model the cfg builds", 'cfg.yml')
    assert digest(run / 'checkpoints') == before


def test_unreadable_test_images_are_left_out_of_r_precision_and_counted(tiny_shapes, tmp_path):
    """An encoder evaluation drops an unreadable test image (with its caption and class) instead
    of scoring a grey stand-in, and says how many it dropped."""
    import pretrain_DAMSM
    import utils

    keys = sorted(utils.list_images(os.path.join(tiny_shapes, 'CUB_200_2011', 'images')))[:6]
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'not a jpeg')
    items = [(k, ['a caption', 'another'], i % 3) for i, k in enumerate(keys)] + [
        (str(bad), ['x', 'y'], 0)
    ]
    loader = torch.utils.data.DataLoader(
        pretrain_DAMSM.EvalSet(items, size=16), batch_size=4, collate_fn=pretrain_DAMSM.collate_eval
    )
    batches = list(loader)
    assert sum(len(b.get('image', [])) for b in batches) == 6
    assert [len(b['skipped']) for b in batches] == [0, 1]
    assert 'broken.jpg' in batches[1]['skipped'][0]
    assert batches[1]['class_id'].tolist() == [1, 2]


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    import errno

    import utils

    net = torch.nn.Linear(3, 2)
    first = utils.save_checkpoint(str(tmp_path), 'run', 1, models={'net': net})
    before = digest(tmp_path)
    real_fsync = os.fsync

    def full(fd):  # the bytes reach the temporary file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, 'fsync', full)
    with torch.no_grad():
        net.weight.add_(1.0)
    with pytest.raises(utils.UserError) as e:
        utils.save_checkpoint(str(tmp_path), 'run', 2, models={'net': net})
    monkeypatch.setattr(os, 'fsync', real_fsync)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and 'run_00000002.pt' in msg
    assert os.strerror(errno.ENOSPC) in msg and 'nothing was overwritten' in msg
    assert digest(tmp_path) == before  # no partial file, no temporary file, the old one intact
    state = utils.load_checkpoint(first, 'run')
    assert state['step'] == 1 and not torch.equal(state['models']['net']['weight'], net.weight)
