"""Files as users have them: AttnGAN's CUB metadata in its exact bytes (protocol-0 pickles
with numpy int64 class ids, and their CRLF copies)."""

import math
import os
import pickle
import shutil

import numpy as np
import pytest
from conftest import protocol0_int64_list, protocol0_names, write_attngan_metadata

import utils


KEYS = [
    '002.Laysan_Albatross/Laysan_Albatross_0002_1027',
    '002.Laysan_Albatross/Laysan_Albatross_0003_1033',
    '003.Sooty_Albatross/Sooty_Albatross_0001_1071',
]
CLASSES = [2, 2, 3]


def test_fixture_bytes_are_the_real_layout():
    data = protocol0_int64_list(CLASSES)
    head = (
        b"(lp0\ncnumpy.core.multiarray\nscalar\np1\n(cnumpy\ndtype\np2\n(S'i8'\np3\nI0\nI1\ntp4\nRp5\n"
        b"(I3\nS'<'\np6\nNNNI-1\nI-1\nI0\ntp7\nbS'\\x02\\x00\\x00\\x00\\x00\\x00\\x00\\x00'\np8\ntp9\n"
        b"Rp10\nag10\n"
    )
    assert data.startswith(head)
    # the bytes this test built are what numpy's own pickling gives: plain pickle (on these
    # trusted bytes only) returns numpy int64 scalars, as it does on AttnGAN's file
    got = pickle.loads(data, encoding='latin1')
    assert got == CLASSES and all(type(v) is np.int64 for v in got)
    assert pickle.loads(protocol0_names(KEYS), encoding='latin1') == KEYS


@pytest.mark.parametrize('crlf', [False, True])
def test_attngan_cub_metadata_reads(tmp_path, crlf):
    conv = (lambda b: b.replace(b'\n', b'\r\n')) if crlf else (lambda b: b)
    (tmp_path / 'f.pickle').write_bytes(conv(protocol0_names(KEYS)))
    (tmp_path / 'c.pickle').write_bytes(conv(protocol0_int64_list(CLASSES)))
    assert utils.safe_pickle_load(str(tmp_path / 'f.pickle')) == KEYS
    got = utils.safe_pickle_load(str(tmp_path / 'c.pickle'))
    assert [int(v) for v in got] == CLASSES and all(isinstance(v, np.int64) for v in got)


def test_numpy_reconstruction_is_limited_to_numeric_scalars(tmp_path):
    marker = tmp_path / 'ran'
    cases = {
        # an object dtype would let the pickle hand back any object
        'object_dtype': b"cnumpy\ndtype\n(S'O'\nI0\nI1\ntR.",
        'object_scalar': b"cnumpy.core.multiarray\nscalar\n(cnumpy\ndtype\n(S'O8'\nI0\nI1\ntRS'x'\ntR.",
        # the numpy module's other globals are still refused
        'numpy_other': b"cnumpy\nload\n(S'x'\ntR.",
        'code': b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        'wrong_length': b"cnumpy._core.multiarray\nscalar\n(cnumpy\ndtype\n(S'i8'\nI0\nI1\ntRS'\\x01'\ntR.",
    }
    for name, data in cases.items():
        p = tmp_path / f'{name}.pickle'
        p.write_bytes(data)
        with pytest.raises(utils.UserError, match='unsafe or corrupt pickle'):
            utils.safe_pickle_load(str(p))
    assert not marker.exists()
    ok = tmp_path / 'f8.pickle'  # numpy >= 2's module name, a float kind
    ok.write_bytes(
        b"cnumpy._core.multiarray\nscalar\n(cnumpy\ndtype\n(S'f8'\nI0\nI1\ntR"
        b"S'\\x00\\x00\\x00\\x00\\x00\\x00\\xf8?'\ntR."
    )
    assert utils.safe_pickle_load(str(ok)) == 1.5


def test_cub_layout_from_real_metadata_trains_one_step(tmp_path, tiny_shapes):
    """The tiny shapes data rewritten with AttnGAN's metadata bytes (CRLF copy): keys and
    classes read, captions and images found."""
    root = tmp_path / 'birds'
    shutil.copytree(tiny_shapes, root)
    write_attngan_metadata(str(root), crlf=True)
    data = utils.AttnGANData(str(root), 10)
    ds = utils.TextImageDataset(data, 'train', base_size=32, branch_num=1, flip=False, crop=False)
    item = ds[0]
    assert item['imgs'][0].shape == (3, 32, 32) and isinstance(item['class_id'], int)
    assert item['text'] in data.raw_captions(data.keys['train'][0])


def test_missing_weights_under_auto_stop_the_run(tmp_path, monkeypatch):
    """'auto' names torchvision's cache; with the file absent the run stops (one line naming it)
    instead of training against a random frozen network."""
    import torch

    import models

    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    enc = models.build_image_encoder(
        {
            'family': 'damsm',
            'dim': 8,
            'backbone': 'small',
            'width': 4,
            'train_backbone': True,
            'image_size': 32,
        }
    )
    with pytest.raises(
        utils.UserError, match=r'hub/checkpoints/inception_v3_google-.*\.pth: Inception-v3'
    ):
        models.load_inception_weights(enc, 'auto')
    with pytest.raises(
        utils.UserError, match=r'hub/checkpoints/resnet50-.*\.pth: ImageNet ResNet-50'
    ):
        models.PretrainedResNet50('auto')
    models.load_inception_weights(enc, '')  # '' is the explicit random init
    # the cache is searched in the order given: a later file is found when the first is absent
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    (tmp_path / 'hub' / 'checkpoints' / models.RESNET50_FILES[1]).write_bytes(b'')
    assert utils.hub_cached(*models.RESNET50_FILES).endswith(models.RESNET50_FILES[1])


# ----------------------------------------------------------------------------------------------
# Released weights of the originals: state dicts built from the original modules' key lists
# (tests/fixtures/original_state_dicts.txt: names and shapes read off MinfengZhu/DM-GAN
# code/model.py and AttnGAN's DAMSM encoders at the shipped cfgs)
# ----------------------------------------------------------------------------------------------
def original_layouts():
    import re

    sections, name = {}, None
    path = os.path.join(os.path.dirname(__file__), 'fixtures', 'original_state_dicts.txt')
    with open(path) as f:
        for line in f:
            if line.startswith('## '):
                name = re.match(r'## (\S+ \(\w+)', line)[1].replace(' (', '@')
                sections[name] = []
            elif line.strip() and not line.startswith('#'):
                key, shape = line.rstrip('\n').split('\t')
                sections[name].append((key, tuple(int(x) for x in re.findall(r'\d+', shape))))
    return sections


def random_state(layout, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(s, generator=g) if s else torch.tensor(3))
        if 'num_batches' not in k
        else torch.tensor(7)
        for k, s in layout
    }


def test_released_dmgan_weights_load_strictly():
    import torch

    import models

    lay = original_layouts()
    for name, r_num in (('G_NET@bird_DMGAN', 2), ('G_NET@coco_DMGAN', 3)):
        state = random_state(lay[name])
        netG = models.DMGANGenerator(64, 100, 100, 256, 3, r_num, 64)
        netG.load_state_dict(models.convert_dmgan_state_dict(state))  # strict
        assert torch.equal(
            netG.init_stage.upsample[3][1].weight, state['h_net1.upsample4.1.weight']
        )
        assert torch.equal(
            netG.stages[1].memory.response_gate[0].bias, state['h_net3.response_gate.0.bias']
        )
        assert torch.equal(netG.img_heads[2][0].weight, state['img_net3.img.0.weight'])
    for name, size in (
        ('D_NET64@bird_DMGAN', 64),
        ('D_NET128@bird_DMGAN', 128),
        ('D_NET256@bird_DMGAN', 256),
    ):
        state = random_state(lay[name])
        netD = models.DMGANDiscriminator(size, 32, 256)
        netD.load_state_dict(models.convert_dmgan_state_dict(state))
        assert torch.equal(
            netD.cond.joint[0].weight_bar, state['COND_DNET.jointConv.0.module.weight_bar']
        )
        assert torch.equal(netD.img_code[6].module.bias, state['img_code_s16.6.module.bias'])
        last = {
            128: 'img_code_s32_1.0.module.weight_u',
            256: 'img_code_s64_2.0.module.weight_u',
        }.get(size)
        if last:
            assert torch.equal(netD.img_code[-2].weight_u, state[last])


def test_released_damsm_encoders_load(tmp_path):
    """text_encoder200.pth + image_encoder200.pth (plain state dicts), the vocabulary of captions.pickle."""
    import torch

    import models

    lay = original_layouts()
    text = random_state(lay['RNN_ENCODER@AttnGAN'])
    image = random_state(lay['CNN_ENCODER@AttnGAN'])
    torch.save(text, tmp_path / 'text_encoder200.pth')
    torch.save(image, tmp_path / 'image_encoder200.pth')
    words = ['<end>'] + [f'w{i}' for i in range(1, 5450)]
    te, ie = models.load_encoders(
        str(tmp_path / 'text_encoder200.pth'), attngan_words=lambda: words
    )
    assert torch.equal(te.encoder.weight, text['encoder.weight'])
    assert torch.equal(
        ie.to_global[2].branch_pool.conv.weight, image['Mixed_7c.branch_pool.conv.weight']
    )
    words_, sent, pad = te.encode(['w1 w2 w3'])
    assert words_.shape == (1, 256, 18) and sent.shape == (1, 256) and int((~pad).sum()) == 3
    with pytest.raises(utils.UserError, match='captions.pickle has 11'):
        models.load_encoders(
            str(tmp_path / 'text_encoder200.pth'), attngan_words=lambda: words[:11]
        )
    with pytest.raises(utils.UserError, match='carry no vocabulary'):
        models.load_encoders(str(tmp_path / 'text_encoder200.pth'))


# What the converted modules compute: bench/parity_originals.py runs the original code/model.py of
# MinfengZhu/DM-GAN and taoxugit/AttnGAN as they are against our modules (float64, the same
# weights and inputs); its --tiny --save run recorded the original's outputs in
# tests/data/dmgan_original_outputs.pt (the command is in the file, 'made_with').
ORIGINAL_OUTPUTS = os.path.join(os.path.dirname(__file__), 'data', 'dmgan_original_outputs.pt')


def parity_bench():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'bench', 'parity_originals.py')
    spec = importlib.util.spec_from_file_location('parity_originals', path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_converted_modules_reproduce_the_original_outputs(tmp_path):
    """G_NET (eval: no padding, padding shared by the batch; train), D_NET64/128/256 (logits,
    sigmoid outputs, power-iterated u/v; train and eval mode), RNN_ENCODER (sorted, and unsorted
    for ours) and CNN_ENCODER (299 and 64 px, eval and train; DM-GAN's with main.py's
    TRAIN.NET_E_ALIGN_CORNERS): the original weights through our loaders give the original's
    outputs."""
    import torch

    bench = parity_bench()
    fx = torch.load(ORIGINAL_OUTPUTS, weights_only=True)
    assert fx['dtype'] == 'float64' and 'parity_originals.py' in fx['made_with']
    nets = fx['nets']
    # Inception's 25M weights are not in the file: the bench's seeded draw, fingerprint-checked
    nets['CNN_ENCODER']['state'] = bench.rebuild_cnn_state(nets['CNN_ENCODER'])
    ratios, cache = {}, {}
    for check in fx['checks']:
        ours = bench.run_ours(check, nets, str(tmp_path), cache, torch.float64)
        for out, (_, _, ratio) in bench.compare_stored(ours, check['ref']).items():
            ratios[f"{check['name']}: {out}"] = ratio
    assert len(fx['checks']) == 18 and len(ratios) == 78
    # float64 on both sides: what is left is rounding (about 1e-12 at most, from the spectral
    # norm's eps: v / (|v| + eps) in DM-GAN's spectral.py, v / max(|v|, eps) here)
    assert max(ratios.values()) < 1e-9, {k: r for k, r in ratios.items() if not r < 1e-9}


def test_converted_modules_match_the_original_code():
    """The bench itself, where the original code is at hand (T2I_ORIGINAL_CODE: a folder
    holding clones DM-GAN/ and AttnGAN/ of the two repositories)."""
    root = os.environ.get('T2I_ORIGINAL_CODE')
    if not root:
        pytest.skip(
            'T2I_ORIGINAL_CODE is unset: set it to a folder with clones DM-GAN/ '
            '(MinfengZhu/DM-GAN) and AttnGAN/ (taoxugit/AttnGAN) to run their code/model.py '
            'against ours (bench/parity_originals.py --tiny)'
        )
    code = [os.path.join(root, name, 'code') for name in ('DM-GAN', 'AttnGAN')]
    for c in code:
        assert os.path.isfile(os.path.join(c, 'model.py')), f'T2I_ORIGINAL_CODE: no {c}/model.py'
    assert parity_bench().main(['--dmgan_code', code[0], '--attngan_code', code[1], '--tiny']) == 0


def test_offline_stand_in_tokenizers_are_refused(tmp_path):
    """transformers offline turns a hub name into a tokenizer of special tokens only (2 for CLIP,
    5 for the Chinese BERT); that must stop the run, not train on [UNK]."""
    from transformers import BertTokenizer

    import models

    stand_in = BertTokenizer(
        vocab={t: i for i, t in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'])}
    )
    with pytest.raises(
        utils.UserError,
        match=r'x: the tokenizer holds only its 5 special tokens.*cn_clip/clip/vocab.txt',
    ):
        utils.check_real_vocabulary(stand_in, 'x', 'bert')
    real = BertTokenizer(
        vocab={
            t: i for i, t in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '红', '色'])
        }
    )
    assert utils.check_real_vocabulary(real, 'x', 'bert') is real
    vocab = tmp_path / 'vocab.txt'  # models.tokenizer_spec applies it to the file it reads
    vocab.write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n')
    with pytest.raises(
        utils.UserError, match=f'MODEL.TOKENIZER_PATH={vocab}: the tokenizer holds only'
    ):
        models.tokenizer_spec('bert', 32, str(vocab))


# ----------------------------------------------------------------------------------------------
# XMC-GAN's resnet_pretrained.npy: np.save of a 0-d object array holding the Flax variables
# {'params': ..., 'batch_stats': ...} of xmcgan/utils/resnet_v1.py's ResNet50 (HWIO kernels)
# ----------------------------------------------------------------------------------------------
TINY = dict(stage_sizes=(1, 1, 1, 1), width=4, num_classes=10)  # ResNet50 at widths / 16


def flax_tree(net, seed=0):
    """Random float32 Flax variables in the net's layout, as nested dicts (kernels scaled by
    1 / sqrt(fan-in) to keep the activations near 1)."""
    rng, tree = np.random.default_rng(seed), {}
    for key, (_, shape, _) in net.flax_tensors().items():
        *path, leaf = key.split('/')
        d = tree
        for p in path:
            d = d.setdefault(p, {})
        a = rng.standard_normal(shape).astype(np.float32)
        if leaf == 'var':
            a = np.abs(a) + 0.5
        elif leaf == 'kernel':
            a /= math.sqrt(math.prod(shape[:-1]))
        d[leaf] = a
    return tree


def flat(tree, prefix=''):
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f'{prefix}{k}/') if isinstance(v, dict) else {f'{prefix}{k}': v})
    return out


def frozen_dict_class(slots):
    """A stand-in for flax.core.frozen_dict.FrozenDict's pickling: flax's __reduce__ returns
    (FrozenDict, (unfreeze(self),)); with `slots` it has none and pickles its __slots__."""
    from collections.abc import Mapping

    class FrozenDict(Mapping):
        __slots__ = ('_dict', '_hash')

        def __init__(self, d):
            self._dict, self._hash = d, None

        def __getitem__(self, k):
            return self._dict[k]

        def __iter__(self):
            return iter(self._dict)

        def __len__(self):
            return len(self._dict)

        if not slots:

            def __reduce__(self):
                def unfreeze(x):
                    return {k: unfreeze(v) for k, v in x.items()} if isinstance(x, Mapping) else x

                return FrozenDict, (unfreeze(self),)

    FrozenDict.__module__, FrozenDict.__qualname__ = 'flax.core.frozen_dict', 'FrozenDict'
    return FrozenDict


def npy_with_payload(path, payload):
    """A .npy of a 0-d object array (the header np.save writes) with this pickle as its payload."""
    with open(path, 'wb') as f:
        np.lib.format.write_array_header_1_0(
            f, {'descr': '|O', 'fortran_order': False, 'shape': ()}
        )
        f.write(payload)


def write_resnet_npy(path, tree, form='numpy'):
    """numpy: np.save as this numpy writes it (numpy._core, pickle protocol 4); numpy1: as numpy 1.x
    wrote the original's file (numpy.core, protocol 3); frozen: 'params'/'batch_stats' are flax
    FrozenDicts (their __reduce__); frozen_slots: every dict a FrozenDict pickled by its slots."""
    import sys
    import types

    if form == 'numpy':
        np.save(path, np.array(tree, dtype=object))
        return
    if form == 'numpy1':
        data = pickle.dumps(np.array(tree, dtype=object), protocol=3)
        data = data.replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')
    else:
        with pytest.MonkeyPatch.context() as mp:
            mods = {n: types.ModuleType(n) for n in ('flax', 'flax.core', 'flax.core.frozen_dict')}
            for n, m in mods.items():
                mp.setitem(sys.modules, n, m)
            FD = mods['flax.core.frozen_dict'].FrozenDict = frozen_dict_class(
                form == 'frozen_slots'
            )
            if form == 'frozen':
                tree = {k: FD(v) for k, v in tree.items()}
            else:

                def freeze(x):
                    return FD({k: freeze(v) for k, v in x.items()}) if isinstance(x, dict) else x

                tree = freeze(tree)
            arr = np.empty((), object)  # np.array would read a Mapping as a sequence of its keys
            arr[()] = tree
            data = pickle.dumps(arr, protocol=4)
        assert b'flax.core.frozen_dict' in data
    npy_with_payload(path, data)


def test_full_resnet50_layout_is_the_original_one():
    """The keys and shapes resnet_v1.py's ResNet50 gives its Flax variables."""
    import models

    lay = {k: s for k, (_, s, _) in models.FlaxResNetV1().flax_tensors().items()}
    assert lay['params/init_conv/kernel'] == (7, 7, 3, 64)
    assert (
        lay['params/init_bn/scale']
        == lay['batch_stats/init_bn/mean']
        == lay['batch_stats/init_bn/var']
        == (64,)
    )
    assert lay['params/head/kernel'] == (2048, 1000) and lay['params/head/bias'] == (1000,)
    for i, (n, f) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        blocks = {k.split('/')[2] for k in lay if k.startswith(f'params/stage{i + 1}/')}
        assert blocks == {f'block{j + 1}' for j in range(n)}
        cin = 64 if i == 0 else 2 * f
        b1 = f'params/stage{i + 1}/block1'
        assert lay[f'{b1}/conv1/kernel'] == (1, 1, cin, f) and lay[f'{b1}/conv2/kernel'] == (
            3,
            3,
            f,
            f,
        )
        assert lay[f'{b1}/conv3/kernel'] == (1, 1, f, 4 * f) and lay[f'{b1}/proj_conv/kernel'] == (
            1,
            1,
            cin,
            4 * f,
        )
        assert lay[f'batch_stats/stage{i + 1}/block1/proj_bn/var'] == (4 * f,)
        assert f'params/stage{i + 1}/block2/proj_conv/kernel' not in lay
    assert not [k for k in lay if 'conv' in k and k.endswith('/bias')]  # convs without bias
    assert {k.split('/')[0] for k in lay} == {'params', 'batch_stats'} and len(
        lay
    ) == 53 + 53 * 4 + 2
    # torchvision's ResNet-50 has the same 25,557,032 parameters
    assert sum(math.prod(s) for k, s in lay.items() if k.startswith('params/')) == 25_557_032


@pytest.mark.parametrize('form', ['numpy', 'numpy1', 'frozen', 'frozen_slots'])
def test_resnet_npy_reads_as_the_original_tree(tmp_path, form):
    import torch

    import models

    net = models.FlaxResNetV1(**TINY)
    tree = flax_tree(net)
    path = str(tmp_path / 'resnet_pretrained.npy')
    write_resnet_npy(path, tree, form)
    got = utils.safe_npy_load(path)
    assert isinstance(got, np.ndarray) and got.shape == () and got.dtype == object
    got = got.item()

    def plain(t):
        return type(t) is dict and all(plain(v) for v in t.values() if isinstance(v, dict))

    assert plain(got)  # FrozenDicts read as dicts
    a, b = flat(tree), flat(got)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == np.float32 and np.array_equal(a[k], b[k]), k
    models.load_flax_resnet(net, got, path)
    v = tree['params']
    assert torch.equal(
        net.stage2.block1.conv2.weight,
        torch.from_numpy(v['stage2']['block1']['conv2']['kernel']).permute(3, 2, 0, 1),
    )
    assert torch.equal(net.head.weight, torch.from_numpy(v['head']['kernel']).t())
    assert torch.equal(
        net.stage4.block1.proj_bn.running_var,
        torch.from_numpy(tree['batch_stats']['stage4']['block1']['proj_bn']['var']),
    )


def test_resnet_npy_with_code_is_refused(tmp_path):
    """A pickle that names code (inside an np.save'd tree, or as the whole payload) stops with one
    line naming the file, and never runs; numpy's array reconstruction is limited to checked
    numeric dtypes and raw bytes (an object array from raw bytes would forge pointers)."""
    import builtins
    import os as os_

    marker = tmp_path / 'ran'

    class System:
        def __reduce__(self):
            return os_.system, (f'touch {marker}',)

    class Eval:
        def __reduce__(self):
            return builtins.eval, (f"open({str(marker)!r}, 'w')",)

    class ObjectFromBytes:
        def __reduce__(self):
            return (
                np._core.multiarray._reconstruct,
                (np.ndarray, (0,), b'b'),
                (1, (1,), np.dtype(object), False, b'\0' * 8),
            )

    cases = {
        'system': pickle.dumps(np.array({'params': {'x': System()}}, dtype=object), protocol=4),
        'eval': pickle.dumps(np.array([Eval()], dtype=object), protocol=3),
        'raw_system': b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        'object_from_bytes': pickle.dumps(ObjectFromBytes(), protocol=4),
        'structured': pickle.dumps(
            np.array({'x': np.zeros(2, [('a', 'f4')])}, dtype=object), protocol=4
        ),
        'numpy_call': pickle.dumps(np.array({'x': np.load}, dtype=object), protocol=4),
    }
    for name, payload in cases.items():
        p = tmp_path / f'{name}.npy'
        npy_with_payload(p, payload)
        with pytest.raises(
            utils.UserError, match=f'^{p}: unsafe or corrupt pickle in the .npy file'
        ) as e:
            utils.safe_npy_load(str(p))
        assert '\n' not in str(e.value), name
    assert not marker.exists()
    np.save(tmp_path / 'plain.npy', np.zeros(3, np.float32))
    with pytest.raises(utils.UserError, match='plain float32 array, not a pickled object array'):
        utils.safe_npy_load(str(tmp_path / 'plain.npy'))


def test_resnet_npy_mapping_is_strict(tmp_path):
    import models

    net, path = models.FlaxResNetV1(**TINY), 'r.npy'
    tree = flax_tree(net)
    del tree['batch_stats']['stage3']['block1']['bn2']['var']
    with pytest.raises(
        utils.UserError,
        match='^r.npy: missing Flax ResNet-50 variable batch_stats/stage3/block1/bn2/var',
    ):
        models.load_flax_resnet(net, tree, path)
    tree = flax_tree(net)
    tree['params']['stage1']['block1']['conv1']['bias'] = np.zeros(4, np.float32)
    with pytest.raises(
        utils.UserError, match='unexpected Flax ResNet-50 variable params/stage1/block1/conv1/bias'
    ):
        models.load_flax_resnet(net, tree, path)
    tree = flax_tree(net)
    tree['params']['init_conv']['kernel'] = np.zeros((4, 3, 7, 7), np.float32)  # OIHW, not HWIO
    with pytest.raises(
        utils.UserError,
        match=r'params/init_conv/kernel is float32 \(4, 3, 7, 7\), '
        r'expected float \(7, 7, 3, 4\)',
    ):
        models.load_flax_resnet(net, tree, path)
    with pytest.raises(utils.UserError, match='holds a list'):
        models.load_flax_resnet(net, [tree], path)
    with pytest.raises(utils.UserError, match='absent.npy: ResNet-50 weights file not found'):
        models.PretrainedResNet50(str(tmp_path / 'absent.npy'))


def test_same_padding_as_flax_computes_it():
    """'SAME' as TF/Flax pads: ceil(n / s) outputs, the odd pixel after (2 / 3 for the 7x7/2 conv
    and 0 / 1 for the 3x3/2 pool and convs on even inputs)."""
    import torch
    import torch.nn.functional as F

    import models

    assert models.same_pads(224, 7, 2) == (2, 3) and models.same_pads(112, 3, 2) == (0, 1)
    assert models.same_pads(56, 3, 2) == (0, 1) and models.same_pads(33, 7, 2) == (3, 3)
    assert models.same_pads(7, 3, 1) == (1, 1) and models.same_pads(56, 1, 2) == (0, 0)
    torch.manual_seed(0)
    conv = models.SameConv2d(3, 5, 7, 2)
    x = torch.randn(2, 3, 10, 12)
    torch.testing.assert_close(conv(x), F.conv2d(F.pad(x, (2, 3, 2, 3)), conv.weight, stride=2))
    # the pool against a loop over windows clipped to the image (the padding never wins a max)
    y = torch.randn(1, 4, 8, 6) - 10
    ref = torch.empty(1, 4, 4, 3)
    for i in range(4):
        for j in range(3):
            ref[..., i, j] = y[..., 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].amax((-2, -1))
    torch.testing.assert_close(models.max_pool_same(y), ref)


def reference_forward(tree, x, stage_sizes):
    """resnet_v1.py's ResNet50 written out from the Flax variables (NCHW; BatchNorm at inference)."""
    import torch
    import torch.nn.functional as F

    p, s = tree['params'], tree['batch_stats']

    def conv(x, v, stride=1):
        k = torch.from_numpy(v['kernel']).permute(3, 2, 0, 1)
        pads = []
        for n in reversed(x.shape[-2:]):  # TF 'SAME': ceil(n / stride) outputs
            total = max((math.ceil(n / stride) - 1) * stride + k.shape[-1] - n, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), k, stride=stride)

    def bn(x, v, st):
        def t(a):
            return torch.from_numpy(a).view(1, -1, 1, 1)

        return (x - t(st['mean'])) / torch.sqrt(t(st['var']) + 1e-5) * t(v['scale']) + t(v['bias'])

    x = bn(conv(x, p['init_conv'], 2), p['init_bn'], s['init_bn'])
    x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-math.inf), 3, 2)  # even sizes here
    for i, n in enumerate(stage_sizes):
        for j in range(n):
            name = (f'stage{i + 1}', f'block{j + 1}')
            v, st = p[name[0]][name[1]], s[name[0]][name[1]]
            stride = 2 if i and not j else 1
            y = F.relu(bn(conv(x, v['conv1']), v['bn1'], st['bn1']))
            y = F.relu(bn(conv(y, v['conv2'], stride), v['bn2'], st['bn2']))
            y = bn(conv(y, v['conv3']), v['bn3'], st['bn3'])
            res = (
                bn(conv(x, v['proj_conv'], stride), v['proj_bn'], st['proj_bn'])
                if 'proj_conv' in v
                else x
            )
            x = F.relu(res + y)
    return x.mean((2, 3)) @ torch.from_numpy(p['head']['kernel']) + torch.from_numpy(
        p['head']['bias']
    )


def jax_bilinear_resize(x, size):
    """jax.image.resize(x, ..., 'bilinear') (antialias=True): a triangle filter stretched by
    1 / scale when shrinking, weights normalised per output pixel (scale_and_translate)."""
    import torch

    def weights(n):
        scale = size / n
        sample = (np.arange(size) + 0.5) / scale - 0.5
        w = np.maximum(0, 1 - np.abs(sample[None, :] - np.arange(n)[:, None]) / max(1 / scale, 1))
        return torch.from_numpy(w / w.sum(0, keepdims=True)).float()  # (n, size)

    return torch.einsum('bchw,hi,wj->bcij', x, weights(x.shape[-2]), weights(x.shape[-1]))


def test_flax_resnet_forward_equals_the_original_computation():
    import torch

    import models

    net = models.FlaxResNetV1(**TINY)
    tree = flax_tree(net, seed=1)
    models.load_flax_resnet(net, tree, 'r.npy')
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            net.eval()(x), reference_forward(tree, x, TINY['stage_sizes']), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize('size', [256, 128])
def test_pretrained_resnet_npy_feeds_0_1_images_to_the_head(tmp_path, monkeypatch, size):
    """TRAIN.RESNET=<.npy>: [-1, 1] images become [0, 1], resized as jax.image.resize, no ImageNet
    mean/std; the features are the head's logits (the full net at tiny widths)."""
    import torch

    import models

    tiny = models.FlaxResNetV1(**TINY)
    tree = flax_tree(tiny, seed=2)
    path = str(tmp_path / 'resnet_pretrained.npy')
    write_resnet_npy(path, tree, 'numpy1')
    full = models.FlaxResNetV1
    monkeypatch.setattr(models, 'FlaxResNetV1', lambda: full(**TINY))
    rn = models.PretrainedResNet50(path)
    seen = {}
    rn.net.register_forward_pre_hook(lambda m, a: seen.setdefault('x', a[0]))
    images = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        out = rn(images)
    want_in = jax_bilinear_resize((images + 1) / 2, 224)
    torch.testing.assert_close(seen['x'], want_in, rtol=0, atol=5e-5)  # fp32 rounding
    assert seen['x'].min() >= 0 and seen['x'].max() <= 1
    assert (
        out.shape == (2, 10)
        and not rn.training
        and not any(p.requires_grad for p in rn.parameters())
    )
    with torch.no_grad():
        torch.testing.assert_close(
            out, reference_forward(tree, seen['x'], TINY['stage_sizes']), rtol=1e-4, atol=1e-4
        )


def test_pretrained_resnet_pth_is_resized_as_the_original_then_normalised():
    """TRAIN.RESNET=<.pth> (torchvision weights): the same [0, 1] jax.image.resize input as the
    original's, then ImageNet mean/std as torchvision's weights expect."""
    import torch

    import models

    rn = models.PretrainedResNet50('')
    seen = {}
    rn.net.register_forward_pre_hook(lambda m, a: seen.setdefault('x', a[0]))
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        out = rn(images)
    want = (jax_bilinear_resize((images + 1) / 2, 224) - rn.mean) / rn.std
    torch.testing.assert_close(seen['x'], want, rtol=0, atol=3e-4)  # fp32 rounding, / std
    assert out.shape == (2, 1000)


def test_pretrained_resnet_auto_takes_the_originals_npy_first(tmp_path, monkeypatch):
    """TRAIN.RESNET=auto: data/resnet_pretrained.npy, where the original's README downloads it
    (and pretrained_model_utils.py reads it), before torchvision's cache."""
    import models

    tiny = models.FlaxResNetV1(**TINY)
    os.makedirs(tmp_path / 'data')
    write_resnet_npy(str(tmp_path / 'data' / 'resnet_pretrained.npy'), flax_tree(tiny, 3), 'numpy1')
    full = models.FlaxResNetV1
    monkeypatch.setattr(models, 'FlaxResNetV1', lambda: full(**TINY))
    monkeypatch.chdir(tmp_path)
    assert models.PretrainedResNet50('auto').flax
