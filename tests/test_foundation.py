"""Foundation: cfg/CLI, readers in the real layouts, safe unpickling, checkpoints,
deterministic dataset generation, DDP on gloo."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import utils
from conftest import ROOT, make_tiny_shapes, run_python

PY = sys.executable


# ---------------------------------------------------------------- cfg / CLI
DEFAULTS = {
    'TRAIN': {'BATCH_SIZE': 64, 'LR': 2e-4, 'FLAG': True, 'NET_E': ''},
    'GAN': {'GF_DIM': 128},
    'NAMES': ['a'],
}


def parse(argv):
    return utils.build_cfg(DEFAULTS, utils.base_parser('t').parse_args(argv))


def test_cfg_merge_and_set(tmp_path):
    f = tmp_path / 'c.yml'
    f.write_text('TRAIN:\n  BATCH_SIZE: 10\n  LR: 1\nGAN:\n  GF_DIM: 64\n')
    cfg = parse(
        [
            '--cfg',
            str(f),
            '--set',
            'TRAIN.NET_E=x/text_encoder200.pth',
            '--set',
            'TRAIN.FLAG=false',
            '--set',
            'NAMES=[b, c]',
            '--seed',
            '7',
        ]
    )
    assert cfg.TRAIN.BATCH_SIZE == 10 and cfg.GAN.GF_DIM == 64
    assert cfg.TRAIN.LR == 1.0 and isinstance(cfg.TRAIN.LR, float)  # int accepted for a float key
    assert parse(['--set', 'TRAIN.LR=3e-4']).TRAIN.LR == 3e-4  # YAML 1.1 reads this as a string
    with pytest.raises(utils.UserError, match='expected float'):
        parse(['--set', 'TRAIN.LR=fast'])
    assert cfg.TRAIN.FLAG is False and cfg.NAMES == ['b', 'c'] and cfg.SEED == 7
    assert cfg.TRAIN.NET_E == 'x/text_encoder200.pth'
    assert cfg.OUT_DIR == os.path.join('output', 'c')
    assert DEFAULTS['TRAIN']['BATCH_SIZE'] == 64  # defaults untouched


def test_cfg_unknown_keys_name_the_closest(tmp_path):
    f = tmp_path / 'c.yml'
    f.write_text('TRAIN:\n  BATCH_SIZ: 10\n')
    with pytest.raises(
        utils.UserError, match=r"c.yml: unknown cfg key 'TRAIN.BATCH_SIZ'.*TRAIN.BATCH_SIZE"
    ):
        parse(['--cfg', str(f)])
    with pytest.raises(utils.UserError, match=r"--set: unknown cfg key 'GAN.GF_DIMM'.*GAN.GF_DIM"):
        parse(['--set', 'GAN.GF_DIMM=3'])
    with pytest.raises(utils.UserError, match='expected int'):
        parse(['--set', 'TRAIN.BATCH_SIZE=many'])
    with pytest.raises(utils.UserError, match='is a section'):
        parse(['--set', 'TRAIN=3'])
    with pytest.raises(utils.UserError, match='cfg file not found'):
        parse(['--cfg', str(tmp_path / 'missing.yml')])


def test_script_errors_are_one_line(tmp_path):
    r = run_python('preprocess_data.py', '--set', 'SHAPES.NUM_TRAN=5', '--out', str(tmp_path / 'r'))
    assert r.returncode == 2
    assert r.stderr.strip().count('\n') == 0 and "SHAPES.NUM_TRAIN" in r.stderr, r.stderr
    r = run_python(
        'preprocess_data.py',
        '--gpu',
        '0',
        '--out',
        str(tmp_path / 'r'),
        '--set',
        'SHAPES.NUM_TRAIN=2',
        '--set',
        'SHAPES.NUM_TEST=1',
        '--set',
        f'SHAPES.OUT_DIR={tmp_path / "d"}',
    )
    if torch.cuda.is_available():
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 2 and r.stderr.startswith(
            'error: GPU_ID=0 (--gpu or the cfg): CUDA was asked for'
        )
        assert r.stderr.strip().count('\n') == 0


def test_setup_saves_cfg_and_metrics(tmp_path):
    args = utils.base_parser('t').parse_args(
        ['--out', str(tmp_path / 'run'), '--set', 'GAN.GF_DIM=8']
    )
    run = utils.setup(args, DEFAULTS, tensorboard=False)
    saved = utils.load_yaml(os.path.join(run.out, 'cfg.yml'))
    assert saved['GAN']['GF_DIM'] == 8 and saved['OUT_DIR'] == str(tmp_path / 'run')
    utils.write_metrics(run.out, {'a': 1.0})
    utils.write_metrics(run.out, {'b': np.float32(2)})
    assert json.load(open(os.path.join(run.out, 'metrics.json'))) == {'a': 1.0, 'b': 2.0}
    run.log.info('hello log')
    assert 'hello log' in open(os.path.join(run.out, 'log.txt')).read()


def test_cpu_threads_from_the_cfg(tmp_path):
    before = torch.get_num_threads()
    try:
        args = utils.base_parser('t').parse_args(
            ['--out', str(tmp_path / 'run'), '--set', 'CPU_THREADS=1']
        )
        run = utils.setup(args, DEFAULTS, tensorboard=False)
        assert torch.get_num_threads() == 1
        assert 'CPU threads 1' in open(os.path.join(run.out, 'log.txt')).read()
        args = utils.base_parser('t').parse_args(
            ['--out', str(tmp_path / 'bad'), '--set', 'CPU_THREADS=-2']
        )
        with pytest.raises(
            utils.UserError, match=r"CPU_THREADS=-2: expected 0 \(torch's default\)"
        ):
            utils.setup(args, DEFAULTS, tensorboard=False)
        assert not (tmp_path / 'bad').exists()  # refused before the run dir is made
    finally:
        torch.set_num_threads(before)


def test_progress_is_plain_lines_off_a_terminal(capsys):
    for _ in utils.progress(range(10), desc='train', every=4):
        pass
    out = capsys.readouterr().out
    assert '\r' not in out
    assert [line.split()[1] for line in out.strip().splitlines()] == ['4/10', '8/10', '10/10']


def test_autocast_policies_on_the_cpu():
    """bfloat16 autocast runs anywhere without a scaler; cuda_only (pretrain_DAMSM's float16)
    leaves a CPU run in float32."""
    cpu, a = torch.device('cpu'), torch.randn(2, 2)
    for enabled, dtype, cuda_only, want in (
        (True, torch.bfloat16, False, torch.bfloat16),
        (False, torch.bfloat16, False, torch.float32),
        (True, torch.float16, True, torch.float32),
    ):
        amp, scaler = utils.autocast(cpu, enabled, dtype, cuda_only)
        with amp:
            assert (a @ a).dtype == want and scaler is None


# ---------------------------------------------------------------- safe unpickling
class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f'touch {self.path}',))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / 'pwned'
    bad = tmp_path / 'filenames.pickle'
    bad.write_bytes(pickle.dumps([_Evil(marker)], protocol=2))
    with pytest.raises(utils.UserError, match=r"refusing global '(posix|os)\.system'"):
        utils.safe_pickle_load(str(bad))
    assert not marker.exists()
    good = tmp_path / 'ok.pickle'
    obj = [['a', 'b'], {0: '<end>', 1: 'bird'}, {'bird': 1}, (1.5, None, True)]
    good.write_bytes(pickle.dumps(obj, protocol=2))
    assert utils.safe_pickle_load(str(good)) == obj
    # A Python 2 pickle (protocol 2, byte strings), as AttnGAN's files are: decoded as latin-1.
    py2 = tmp_path / 'py2.pickle'
    py2.write_bytes(b'\x80\x02]q\x00(U\x0c001.Albatrosq\x01K\x05e.')
    assert utils.safe_pickle_load(str(py2)) == ['001.Albatros', 5]


# ---------------------------------------------------------------- readers
def test_cub_layout_reader(tiny_shapes):
    data = utils.AttnGANData(tiny_shapes, 10)
    assert data.is_birds and len(data.keys['train']) == 40 and len(data.keys['test']) == 20
    assert len(data.ids['train']) == 400 and data.ixtoword[0] == '<end>'
    key = data.keys['test'][3]
    caps = data.raw_captions(key)
    assert len(caps) == 10
    assert [data.ixtoword[i] for i in data.ids['test'][30]] == utils.tokenize_attngan(caps[0])
    assert data.class_ids('train')[0] >= 1 and key in data.bbox
    ds = utils.TextImageDataset(
        data, 'train', base_size=8, branch_num=3, words_num=5, two_captions=True
    )
    item = ds[0]
    assert [tuple(t.shape) for t in item['imgs']] == [(3, 8, 8), (3, 16, 16), (3, 32, 32)]
    assert item['imgs'][0].min() >= -1 and item['imgs'][0].max() <= 1
    assert item['caption'].shape == (5,) and 1 <= item['cap_len'] <= 5
    assert item['text'] != item['text2'] and item['text'] in data.raw_captions(item['key'])
    # Long captions keep an order-preserving subset of words_num words.
    ids = [w for w in data.ids['train'][0] if w]
    sub, n = ds.caption(0)
    assert (
        n == 5
        and list(sub.numpy()) == [w for w in ids if w in set(sub.numpy())][:5]
        or n == len(ids)
    )


def test_bird_bbox_crop():
    from PIL import Image

    img = Image.new('RGB', (200, 100))
    # box x=50 y=20 w=40 h=20 -> centre (70, 30), half side 0.75 * 40 = 30
    assert utils.crop_to_bbox(img, [50, 20, 40, 20]).size == (60, 60)


def write_coco_attngan(root, n=3):
    from PIL import Image

    os.makedirs(root / 'images')
    os.makedirs(root / 'text')
    keys = [f'COCO_train2014_{i:012d}' for i in range(n)]
    for i, k in enumerate(keys):
        Image.new('RGB', (40, 30), (i * 60, 0, 0)).save(root / 'images' / f'{k}.jpg')
        (root / 'text' / f'{k}.txt').write_text(
            ''.join(f'A red thing number {i} {j}.\n' for j in range(5))
        )
    for split, ks in (('train', keys[:2]), ('test', keys[2:])):
        os.makedirs(root / split)
        (root / split / 'filenames.pickle').write_bytes(pickle.dumps(ks, protocol=2))
    return keys


def test_coco_attngan_layout(tmp_path):
    keys = write_coco_attngan(tmp_path / 'coco')
    data = utils.AttnGANData(str(tmp_path / 'coco'), 5)
    assert not data.is_birds and data.keys['test'] == keys[2:]
    assert os.path.isfile(tmp_path / 'coco' / 'captions.pickle')  # built as AttnGAN does
    assert data.class_ids('test') == [0]  # no class_info: arange
    ds = utils.TextImageDataset(data, 'test', base_size=16, branch_num=1, words_num=12, train=False)
    assert ds[0]['imgs'][0].shape == (3, 16, 16)
    with pytest.raises(utils.UserError, match='CAPTIONS_PER_IMAGE'):
        utils.AttnGANData(str(tmp_path / 'coco'), 10)
    with pytest.raises(utils.UserError, match=r"filenames.pickle: missing"):
        shutil.rmtree(tmp_path / 'coco' / 'test')
        utils.AttnGANData(str(tmp_path / 'coco'), 5)
    with pytest.raises(utils.UserError, match='data directory not found'):
        utils.AttnGANData(str(tmp_path / 'nowhere'), 5)


def test_coco_json_csv_jsonl_folder(tmp_path):
    from PIL import Image

    (tmp_path / 'train2014').mkdir()
    for i in (1, 2):
        Image.new('RGB', (8, 8)).save(tmp_path / 'train2014' / f'COCO_train2014_{i:012d}.jpg')
    js = {
        'images': [
            {'id': 2, 'file_name': 'COCO_train2014_000000000002.jpg'},
            {'id': 1, 'file_name': 'COCO_train2014_000000000001.jpg'},
        ],
        'annotations': [
            {'id': 9, 'image_id': 1, 'caption': 'a cat '},
            {'id': 8, 'image_id': 2, 'caption': 'a dog'},
            {'id': 7, 'image_id': 1, 'caption': 'a kitten'},
        ],
    }
    (tmp_path / 'captions_train2014.json').write_text(json.dumps(js))
    pairs = utils.read_coco_json(
        str(tmp_path / 'captions_train2014.json'), str(tmp_path / 'train2014')
    )
    assert [os.path.basename(p) for p, _ in pairs] == [
        'COCO_train2014_000000000001.jpg',
        'COCO_train2014_000000000002.jpg',
    ]
    assert pairs[0][1] == ['a cat', 'a kitten'] and pairs[1][1] == ['a dog']

    (tmp_path / 'c.csv').write_text('img,cap\ntrain2014/COCO_train2014_000000000001.jpg,hello\n')
    got = utils.read_csv_pairs(str(tmp_path / 'c.csv'), 'img', 'cap', sep=',')
    assert got == [(str(tmp_path / 'train2014/COCO_train2014_000000000001.jpg'), 'hello')]
    with pytest.raises(utils.UserError, match="no column 'filepath'"):
        utils.read_csv_pairs(str(tmp_path / 'c.csv'), sep=',')

    (tmp_path / 'd.jsonl').write_text(
        json.dumps({'image_path': '/abs/x.jpg', 'sentences': '一只猫'}) + '\n\n'
    )
    assert utils.read_jsonl_pairs(str(tmp_path / 'd.jsonl')) == [('/abs/x.jpg', '一只猫')]
    (tmp_path / 'e.jsonl').write_text('{"path": 1}\n')
    with pytest.raises(utils.UserError, match=r'e.jsonl:1: expected'):
        utils.read_jsonl_pairs(str(tmp_path / 'e.jsonl'))

    deep = tmp_path / 'folder' / 'a' / 'b'
    deep.mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(deep / 'x.png')
    (deep / 'x.txt').write_text('first caption\n\nsecond caption\n')
    Image.new('RGB', (8, 8)).save(deep / 'no_caption.png')
    assert utils.read_pairs(str(tmp_path / 'folder')) == [
        (str(deep / 'x.png'), ['first caption', 'second caption'])
    ]


def test_corrupt_image_is_skipped_and_counted(tmp_path, tiny_shapes):
    from torchvision import transforms
    from PIL import Image

    good = tmp_path / 'good.png'
    Image.new('RGB', (8, 8), (255, 0, 0)).save(good)
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'not a png at all')
    ds = utils.PairDataset([(str(bad), 'x'), (str(good), 'y')], transforms.ToTensor())
    imgs = [ds[i] for i in range(2)]
    assert len(ds.bad) == 1 and all(t == 'y' for _, t in imgs)
    data_dir = tmp_path / 'shapes'
    shutil.copytree(tiny_shapes, data_dir)
    data = utils.AttnGANData(str(data_dir), 10)
    open(data.image_path(data.keys['train'][0]), 'wb').write(b'\xff\xd8 truncated jpeg')
    tds = utils.TextImageDataset(data, 'train', base_size=8, branch_num=1)
    assert tds[0]['key'] == data.keys['train'][1] and len(tds.bad) == 1
    tds[0]
    assert len(tds.bad) == 1  # each bad file counted once
    # every image unreadable (far more than Python's recursion limit): one line, no RecursionError
    many = utils.PairDataset([(str(bad), 'x')] * 3000, transforms.ToTensor())
    with pytest.raises(utils.UserError, match='no readable image among the 3000 items'):
        many[0]


# ---------------------------------------------------------------- dataset generation
def test_shapes_generation_is_deterministic(tmp_path):
    a = make_tiny_shapes(tmp_path / 'a', 6, 3, 24, seed=5)
    b = make_tiny_shapes(tmp_path / 'b', 6, 3, 24, seed=5)
    c = make_tiny_shapes(tmp_path / 'c', 6, 3, 24, seed=6)

    def files(root):
        out = {}
        for d, _, fs in os.walk(root):
            for f in fs:
                p = os.path.join(d, f)
                out[os.path.relpath(p, root)] = open(p, 'rb').read()
        return out

    fa, fb = files(a), files(b)
    assert fa == fb and len(fa) > 20
    assert files(c) != fa
    attrs = json.load(open(os.path.join(a, 'attributes.json')))
    for key, at in attrs.items():
        caps = open(os.path.join(a, 'text', key + '.txt')).read().splitlines()
        assert len(caps) == 10 and len(set(caps)) >= 5
        for o in at['objects']:  # every caption names every object's colour
            assert all(o['colour'] in cap for cap in caps)
    # Re-running with the same settings is a no-op; other settings are refused.
    make_tiny_shapes(tmp_path / 'a', 6, 3, 24, seed=5)
    with pytest.raises(utils.UserError, match='other settings'):
        make_tiny_shapes(tmp_path / 'a', 7, 3, 24, seed=5)


# ---------------------------------------------------------------- checkpoints
def toy_state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0, growth_interval=2)
    return model, opt, sched, scaler


def toy_step(model, opt, sched, scaler):
    x = torch.randn(16, 4)  # consumes the torch RNG: resume must restore it
    noise = float(np.random.rand())  # and numpy's
    loss = ((model(x) - x.sum(1, keepdim=True) - noise) ** 2).mean()
    opt.zero_grad()
    scaler.scale(loss).backward()  # the scale grows every 2 steps: state to restore
    scaler.step(opt)
    scaler.update()
    sched.step()
    return loss.item(), scaler.get_scale()


def test_resume_restores_every_piece_of_state(tmp_path):
    utils.seed_everything(1)
    model, opt, sched, scaler = toy_state()
    straight = [toy_step(model, opt, sched, scaler) for _ in range(6)]

    utils.seed_everything(1)
    model, opt, sched, scaler = toy_state()
    first = [toy_step(model, opt, sched, scaler) for _ in range(3)]
    utils.save_checkpoint(
        str(tmp_path),
        'toy',
        3,
        {'m': model},
        {'o': opt},
        {'s': sched},
        scaler=scaler,
        epoch=1,
        cfg=utils.to_cfg({'A': 1}),
    )
    for _ in range(5):  # wander off: the restore must undo all of this
        toy_step(model, opt, sched, scaler)
    torch.rand(100), np.random.rand(100)

    model2, opt2, sched2, scaler2 = toy_state(seed=99)
    ckpt = utils.resolve_resume('auto', str(tmp_path), 'toy')
    step, epoch = utils.restore_checkpoint(ckpt, {'m': model2}, {'o': opt2}, {'s': sched2}, scaler2)
    assert (step, epoch, ckpt['cfg']) == (3, 1, {'A': 1}) and scaler2.get_scale() == 2048.0
    rest = [toy_step(model2, opt2, sched2, scaler2) for _ in range(3)]
    assert first + rest == straight


def test_checkpoint_keep_kind_and_errors(tmp_path):
    model = torch.nn.Linear(2, 2)
    for s in range(5):
        utils.save_checkpoint(str(tmp_path), 'toy', s, {'m': model}, keep=2)
    assert [os.path.basename(p) for p in utils.list_checkpoints(str(tmp_path), 'toy')] == [
        'toy_00000003.pt',
        'toy_00000004.pt',
    ]
    path = utils.list_checkpoints(str(tmp_path), 'toy')[-1]
    with pytest.raises(utils.UserError, match="kind 'toy', expected 'dmgan'"):
        utils.load_checkpoint(path, 'dmgan')
    torch.save(model.state_dict(), tmp_path / 'plain.pt')
    with pytest.raises(utils.UserError, match="not a t2i-repro training checkpoint"):
        utils.load_checkpoint(str(tmp_path / 'plain.pt'))
    # A truncated newest checkpoint: --resume auto falls back to the previous one.
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[: len(data) // 2])
    assert utils.resolve_resume('auto', str(tmp_path), 'toy')['step'] == 3
    assert utils.resolve_resume('auto', str(tmp_path / 'empty'), 'toy') is None
    with pytest.raises(utils.UserError, match='checkpoint not found'):
        utils.resolve_resume(str(tmp_path / 'nope.pt'), str(tmp_path), 'toy')


def test_write_killed_midway_leaves_previous_checkpoint(tmp_path):
    utils.save_checkpoint(str(tmp_path), 'toy', 1, {'m': torch.nn.Linear(3, 3)})
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        sys.path.insert(0, {ROOT!r})
        import utils
        os.fsync = lambda fd: time.sleep(120)     # hang after the temp write, before the rename
        utils.save_checkpoint({str(tmp_path)!r}, 'toy', 1, {{'m': torch.nn.Linear(300, 300)}})
    """)
    p = subprocess.Popen([PY, '-c', script])
    ckdir = tmp_path / 'checkpoints'
    for _ in range(600):
        if any('.tmp.' in f for f in os.listdir(ckdir)):
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert any('.tmp.' in f for f in os.listdir(ckdir))  # the killed write got that far
    ckpt = utils.resolve_resume('auto', str(tmp_path), 'toy')
    assert ckpt['models']['m']['weight'].shape == (3, 3)  # the previous one, intact


# ---------------------------------------------------------------- distributed
DDP_SCRIPT = """
import atexit, os, sys, json, torch
sys.path.insert(0, {root!r})
import utils

def main():
    args = utils.base_parser('ddp').parse_args()
    run = utils.setup(args, {{'N': 8}}, tensorboard=False)
    atexit.register(lambda: open(os.path.join({tmp!r}, f'exit{{run.rank}}'), 'w').close())
    ds = torch.utils.data.TensorDataset(torch.arange(run.cfg.N, dtype=torch.float32)[:, None])
    loader = utils.make_loader(ds, batch_size=2, shuffle=False)
    seen = torch.cat([b[0] for b in loader])
    lin = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(lin.weight, 1.0 if run.rank == 0 else 0.0)
    model = utils.wrap_ddp(lin, run.device)     # broadcasts rank 0's weights
    x = seen * (run.rank + 1)
    feats = utils.all_gather_with_grad(model(x))
    feats.sum().backward()
    out = dict(rank=run.rank, world=run.world, seen=seen.flatten().tolist(), gathered=feats.shape[0],
               grad=utils.unwrap(model).weight.grad.item(), w=utils.unwrap(model).weight.item(),
               mean=utils.all_reduce_mean(float(run.rank)))
    json.dump(out, open(os.path.join({tmp!r}, f'rank{{run.rank}}.json'), 'w'))
    utils.save_checkpoint(run.out, 'ddp', 1, {{'m': model}})
    if os.environ.get('BAD_INPUT'):
        raise utils.UserError(f'rank {{run.rank}}: bad input')

utils.run_main(main)
"""


@pytest.mark.slow
def test_ddp_gloo_two_processes(tmp_path):
    script = tmp_path / 'ddp.py'
    script.write_text(DDP_SCRIPT.format(root=ROOT, tmp=str(tmp_path)))
    r = run_python(
        '-m',
        'torch.distributed.run',
        '--standalone',
        '--nproc_per_node=2',
        script,
        '--out',
        tmp_path / 'run',
        timeout=240,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    outs = [json.load(open(tmp_path / f'rank{i}.json')) for i in range(2)]
    assert [o['world'] for o in outs] == [2, 2]
    assert sorted(outs[0]['seen'] + outs[1]['seen']) == list(range(8))  # DistributedSampler shards
    assert not set(outs[0]['seen']) & set(outs[1]['seen'])
    assert all(o['gathered'] == 8 for o in outs)
    assert outs[0]['w'] == outs[1]['w'] == 1.0  # DDP broadcast rank 0's weights
    # d(sum of gathered)/dw: each rank's local shard only, averaged by DDP across ranks
    expect = (sum(outs[0]['seen']) * 1 + sum(outs[1]['seen']) * 2) / 2
    assert outs[0]['grad'] == pytest.approx(expect) and outs[1]['grad'] == pytest.approx(expect)
    assert outs[0]['mean'] == 0.5
    assert len(os.listdir(tmp_path / 'run' / 'checkpoints')) == 1  # only rank 0 saved
    assert r.stdout.count('run dir') == 1  # only rank 0 logs
    # the ranks leave without finalizing the interpreter, after the exit handlers ran
    assert (tmp_path / 'exit0').exists() and (tmp_path / 'exit1').exists()


@pytest.mark.slow
def test_ddp_bad_input_is_one_line_per_rank_and_a_failed_run(tmp_path):
    script = tmp_path / 'ddp.py'
    script.write_text(DDP_SCRIPT.format(root=ROOT, tmp=str(tmp_path)))
    r = run_python(
        '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', script,
        '--out', tmp_path / 'run', timeout=240, cwd=tmp_path, env={'BAD_INPUT': '1'},
    )  # fmt: skip
    assert r.returncode != 0
    assert 'error: rank 0: bad input' in r.stderr and 'error: rank 1: bad input' in r.stderr
    assert f'File "{script}"' not in r.stderr  # no worker traceback (the launcher prints its own)
    assert 'terminate called' not in r.stderr and 'SIGABRT' not in r.stderr
    assert 'exitcode  : 2' in r.stderr  # the one-line error's status, not an abort


TB_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import utils

RUNS = []  # a run still reachable when the interpreter finalizes (its writer never collected)

def main():
    run = utils.setup(utils.base_parser('tb').parse_args(), {{}}, tensorboard=True)
    RUNS.append(run)
    for step in range(3):
        run.writer.add_scalar('loss', 1.0 / (step + 1), step)

utils.run_main(main)
"""


def test_tensorboard_scalars_are_on_disk_after_a_run_that_never_closed_its_writer(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = tmp_path / 'tb.py'
    script.write_text(TB_SCRIPT.format(root=ROOT))
    r = run_python(script, '--out', tmp_path / 'run', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    events = EventAccumulator(str(tmp_path / 'run' / 'tb'))
    events.Reload()
    assert [(e.step, round(e.value, 3)) for e in events.Scalars('loss')] == [
        (0, 1.0), (1, 0.5), (2, 0.333)
    ]  # fmt: skip


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    utils.atomic_write_bytes(str(path), b'old')
    real_fsync = os.fsync

    def full(fd):  # the disk fills up while the new file is written
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(utils.UserError, match=r'ckpt.pt: cannot write \(No space left on device\)'):
        utils.atomic_write_bytes(str(path), b'new' * 1000)
    monkeypatch.setattr(os, 'fsync', real_fsync)
    assert path.read_bytes() == b'old' and os.listdir(tmp_path) == ['ckpt.pt']
    with pytest.raises(utils.UserError, match='cannot write'):  # the target is a folder
        utils.atomic_write_bytes(str(tmp_path), b'x')


@pytest.mark.parametrize(
    'key,value,expected',
    [
        ('TRAIN.BATCH_SIZE', '0', 'at least 1'),
        ('TRAIN.BATCH_SIZE', '-1', 'at least 1'),
        ('TRAIN.GENERATOR_LR', '.nan', 'a finite learning rate'),
        ('TRAIN.GENERATOR_LR', '-1e-3', 'a finite learning rate'),
        ('TRAIN.EMA_DECAY', '1.5', r'in \[0, 1\]'),
        ('TRAIN.MAX_EPOCH', '-2', '>= 0'),
    ],
)
def test_bad_values_are_refused_where_the_cfg_is_read(key, value, expected):
    import main

    args = utils.base_parser('x').parse_args(['--set', f'{key}={value}'])
    with pytest.raises(utils.UserError, match=f'--set: {key}=.*: expected {expected}'):
        utils.build_cfg(main.DEFAULTS, args)


def test_non_utf8_cfg_and_legacy_launcher_flag(tmp_path, monkeypatch):
    bad = tmp_path / 'latin1.yml'
    bad.write_bytes('CONFIG_NAME: caf\xe9\n'.encode('latin-1'))
    with pytest.raises(utils.UserError, match='not UTF-8 text'):
        utils.load_yaml(str(bad))
    monkeypatch.setattr(os, 'environ', {k: v for k, v in os.environ.items() if k != 'LOCAL_RANK'})
    args = utils.base_parser('x').parse_args(
        ['--local-rank=1']
    )  # python -m torch.distributed.launch
    utils.build_cfg({}, args)
    assert os.environ['LOCAL_RANK'] == '1'
    assert utils.base_parser('x').parse_args(['--local_rank', '0']).local_rank == 0


def test_resume_says_what_the_checkpoint_keeps(caplog):
    import logging

    saved = utils.to_cfg({'TRAIN': {'GENERATOR_LR': 1e-3, 'MAX_EPOCH': 2}, 'OUT_DIR': 'a'})
    now = utils.to_cfg({'TRAIN': {'GENERATOR_LR': 5e-4, 'MAX_EPOCH': 4}, 'OUT_DIR': 'b'})
    with caplog.at_level(logging.INFO, logger='resume_test'):
        utils.report_resume_differences(
            {'cfg': saved.to_dict()}, now, logging.getLogger('resume_test')
        )
    warn = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert warn == [
        "TRAIN.GENERATOR_LR=0.0005 is not used: resuming keeps the checkpoint's optimizer state "
        "(lr 0.001); start a new run dir for a new learning rate"
    ]
    assert any(
        'TRAIN.MAX_EPOCH (2 -> 4)' in r.message and 'OUT_DIR' not in r.message
        for r in caplog.records
    )


def test_dataloader_worker_errors_are_one_line(tmp_path):
    """Images of mixed sizes fail in a worker's collate: one line, not the worker's traceback."""
    from PIL import Image

    for i, size in enumerate((8, 8, 16, 16)):
        Image.new('RGB', (size, size)).save(tmp_path / f'{i}.png')
    code = (
        "import sys, torch; from torchvision import transforms; sys.path.insert(0, %r); import utils\n"
        "def main():\n"
        "    ds = utils.PairDataset([(%r + f'/{i}.png', 'x') for i in range(4)], transforms.ToTensor())\n"
        "    list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1))\n"
        "utils.run_main(main)\n"
    ) % (ROOT, str(tmp_path))
    r = run_python('-c', code, timeout=120)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.startswith(
        'error: in a data-loading worker: RuntimeError: stack expects each tensor'
    )
    assert r.stderr.strip().count('\n') == 0


def test_run_dir_with_checkpoints_is_refused_without_resume(tmp_path):
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    (run / 'checkpoints' / 'vae_00000016.pt').write_bytes(b'old run')
    (run / 'cfg.yml').write_text('old: cfg\n')
    p = utils.base_parser('x')
    with pytest.raises(
        utils.UserError, match=r'holds a run already \(1 checkpoint\(s\), newest vae_00000016.pt\)'
    ):
        utils.setup(p.parse_args(['--out', str(run)]), {}, tensorboard=False)
    assert (run / 'cfg.yml').read_text() == 'old: cfg\n'  # nothing overwritten
    utils.setup(p.parse_args(['--out', str(run), '--resume', 'auto']), {}, tensorboard=False)
    assert (run / 'checkpoints' / 'vae_00000016.pt').exists()
    utils.setup(p.parse_args(['--out', str(run), '--overwrite']), {}, tensorboard=False)
    assert not (run / 'checkpoints').exists()


# ---------------------------------------------------------------- import graph
SHARED_MODULES = {'models', 'utils'}
# main.py's dispatch of MODEL: XMCGAN cfgs, inside main(): the one script-to-script import
ALLOWED_SCRIPT_IMPORTS = {('main', 'xmc_gan', 'main')}


def project_imports(path, modules):
    """(imported top-level module, enclosing function or None) for every import of `modules`
    in the file, at module level or inside functions."""
    import ast

    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                names = [child.module or ''] if child.level == 0 else []
            else:
                names = []
            found.extend((n.split('.')[0], func) for n in names if n.split('.')[0] in modules)
            inner = (
                child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            )
            visit(child, inner)

    with open(path, encoding='utf-8') as f:
        visit(ast.parse(f.read(), path), None)
    return found


def test_no_top_level_script_imports_another():
    """Scripts share code through models.py and utils.py only; utils.py imports no project
    module (models.py imports it), so the shared modules never pull a script in."""
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py')}
    scripts = modules - SHARED_MODULES
    bad = []
    for name in sorted(modules):
        for target, func in project_imports(os.path.join(ROOT, name + '.py'), modules - {name}):
            if target in scripts and (name, target, func) not in ALLOWED_SCRIPT_IMPORTS:
                bad.append(f"{name}.py imports {target}" + (f" in {func}()" if func else ''))
            elif name == 'utils':
                bad.append(f"utils.py imports {target}" + (f" in {func}()" if func else ''))
    assert not bad, '; '.join(bad)
