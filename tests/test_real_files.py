"""Files as users have them: AttnGAN's CUB metadata in its exact bytes (protocol-0 pickles
with numpy int64 class ids, and their CRLF copies)."""
import os
import pickle
import shutil

import numpy as np
import pytest
from conftest import protocol0_int64_list, protocol0_names, write_attngan_metadata

import utils


KEYS = ['002.Laysan_Albatross/Laysan_Albatross_0002_1027', '002.Laysan_Albatross/Laysan_Albatross_0003_1033',
        '003.Sooty_Albatross/Sooty_Albatross_0001_1071']
CLASSES = [2, 2, 3]


def test_fixture_bytes_are_the_real_layout():
    data = protocol0_int64_list(CLASSES)
    head = (b"(lp0\ncnumpy.core.multiarray\nscalar\np1\n(cnumpy\ndtype\np2\n(S'i8'\np3\nI0\nI1\ntp4\nRp5\n"
            b"(I3\nS'<'\np6\nNNNI-1\nI-1\nI0\ntp7\nbS'\\x02\\x00\\x00\\x00\\x00\\x00\\x00\\x00'\np8\ntp9\n"
            b"Rp10\nag10\n")
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
    ok = tmp_path / 'f8.pickle'       # numpy >= 2's module name, a float kind
    ok.write_bytes(b"cnumpy._core.multiarray\nscalar\n(cnumpy\ndtype\n(S'f8'\nI0\nI1\ntR"
                   b"S'\\x00\\x00\\x00\\x00\\x00\\x00\\xf8?'\ntR.")
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
    enc = models.build_image_encoder({'family': 'damsm', 'dim': 8, 'backbone': 'small', 'width': 4,
                                      'train_backbone': True, 'image_size': 32})
    with pytest.raises(utils.UserError, match=r'hub/checkpoints/inception_v3_google-.*\.pth: Inception-v3'):
        models.load_inception_weights(enc, 'auto')
    with pytest.raises(utils.UserError, match=r'hub/checkpoints/resnet50-.*\.pth: ImageNet ResNet-50'):
        models.PretrainedResNet50('auto')
    models.load_inception_weights(enc, '')          # '' is the explicit random init


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
    return {k: (torch.randn(s, generator=g) if s else torch.tensor(3)) if 'num_batches' not in k
            else torch.tensor(7) for k, s in layout}


def test_released_dmgan_weights_load_strictly():
    import torch

    import models
    lay = original_layouts()
    for name, r_num in (('G_NET@bird_DMGAN', 2), ('G_NET@coco_DMGAN', 3)):
        state = random_state(lay[name])
        netG = models.DMGANGenerator(64, 100, 100, 256, 3, r_num, 64)
        netG.load_state_dict(models.convert_dmgan_state_dict(state))        # strict
        assert torch.equal(netG.init_stage.upsample[3][1].weight, state['h_net1.upsample4.1.weight'])
        assert torch.equal(netG.stages[1].memory.response_gate[0].bias, state['h_net3.response_gate.0.bias'])
        assert torch.equal(netG.img_heads[2][0].weight, state['img_net3.img.0.weight'])
    for name, size in (('D_NET64@bird_DMGAN', 64), ('D_NET128@bird_DMGAN', 128), ('D_NET256@bird_DMGAN', 256)):
        state = random_state(lay[name])
        netD = models.DMGANDiscriminator(size, 32, 256)
        netD.load_state_dict(models.convert_dmgan_state_dict(state))
        assert torch.equal(netD.cond.joint[0].weight_bar, state['COND_DNET.jointConv.0.module.weight_bar'])
        assert torch.equal(netD.img_code[6].module.bias, state['img_code_s16.6.module.bias'])
        last = {128: 'img_code_s32_1.0.module.weight_u', 256: 'img_code_s64_2.0.module.weight_u'}.get(size)
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
    te, ie = models.load_encoders(str(tmp_path / 'text_encoder200.pth'), attngan_words=lambda: words)
    assert torch.equal(te.encoder.weight, text['encoder.weight'])
    assert torch.equal(ie.to_global[2].branch_pool.conv.weight, image['Mixed_7c.branch_pool.conv.weight'])
    words_, sent, pad = te.encode(['w1 w2 w3'])
    assert words_.shape == (1, 256, 18) and sent.shape == (1, 256) and int((~pad).sum()) == 3
    with pytest.raises(utils.UserError, match='captions.pickle has 11'):
        models.load_encoders(str(tmp_path / 'text_encoder200.pth'), attngan_words=lambda: words[:11])
    with pytest.raises(utils.UserError, match='carry no vocabulary'):
        models.load_encoders(str(tmp_path / 'text_encoder200.pth'))


def test_offline_stand_in_tokenizers_are_refused(tmp_path):
    """transformers offline turns a hub name into a tokenizer of special tokens only (2 for CLIP,
    5 for the Chinese BERT); that must stop the run, not train on [UNK]."""
    from transformers import BertTokenizer

    import models
    stand_in = BertTokenizer(vocab={t: i for i, t in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'])})
    with pytest.raises(utils.UserError, match=r'x: the tokenizer holds only its 5 special tokens.*cn_clip/clip/vocab.txt'):
        utils.check_real_vocabulary(stand_in, 'x', 'bert')
    real = BertTokenizer(vocab={t: i for i, t in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '红', '色'])})
    assert utils.check_real_vocabulary(real, 'x', 'bert') is real
    vocab = tmp_path / 'vocab.txt'                 # models.tokenizer_spec applies it to the file it reads
    vocab.write_text('[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n')
    with pytest.raises(utils.UserError, match=f'MODEL.TOKENIZER_PATH={vocab}: the tokenizer holds only'):
        models.tokenizer_spec('bert', 32, str(vocab))
