"""The DALLE pipeline: DiscreteVAE/VQGAN layouts, the DALLE loss and sampling, and a smoke run
of train_vae.py, train_dalle.py (resume, --chinese, CLIP BPE, VQGAN), dalle_gen.py,
clip_sort.py and the Wukong-style filter, all on tiny configs."""

import collections
import hashlib
import math
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from conftest import TINY_JUDGE, ROOT, run_in_process, save_tiny_judge, write_clip_bpe

import clip_sort
import dalle_gen
import models
import preprocess_data
import train_dalle
import train_vae
import utils

# DALLE-pytorch 1.6.6 DiscreteVAE(image_size=16, num_layers=2, num_tokens=16, codebook_dim=8,
# hidden_dim=8, num_resnet_blocks=1).state_dict(), keys and shapes read off the package.
DP_VAE_HPARAMS = dict(
    image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8, num_resnet_blocks=1
)
DP_VAE_LAYOUT = [
    ('codebook.weight', (16, 8)),
    ('encoder.0.0.weight', (8, 3, 4, 4)),
    ('encoder.0.0.bias', (8,)),
    ('encoder.1.0.weight', (8, 8, 4, 4)),
    ('encoder.1.0.bias', (8,)),
    ('encoder.2.net.0.weight', (8, 8, 3, 3)),
    ('encoder.2.net.0.bias', (8,)),
    ('encoder.2.net.2.weight', (8, 8, 3, 3)),
    ('encoder.2.net.2.bias', (8,)),
    ('encoder.2.net.4.weight', (8, 8, 1, 1)),
    ('encoder.2.net.4.bias', (8,)),
    ('encoder.3.weight', (16, 8, 1, 1)),
    ('encoder.3.bias', (16,)),
    ('decoder.0.weight', (8, 8, 1, 1)),
    ('decoder.0.bias', (8,)),
    ('decoder.1.net.0.weight', (8, 8, 3, 3)),
    ('decoder.1.net.0.bias', (8,)),
    ('decoder.1.net.2.weight', (8, 8, 3, 3)),
    ('decoder.1.net.2.bias', (8,)),
    ('decoder.1.net.4.weight', (8, 8, 1, 1)),
    ('decoder.1.net.4.bias', (8,)),
    ('decoder.2.0.weight', (8, 8, 4, 4)),
    ('decoder.2.0.bias', (8,)),
    ('decoder.3.0.weight', (8, 8, 4, 4)),
    ('decoder.3.0.bias', (8,)),
    ('decoder.4.weight', (3, 8, 1, 1)),
    ('decoder.4.bias', (3,)),
]

TINY_VQGAN_YAML = """model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 8
    n_embed: 16
    ddconfig: {double_z: false, z_channels: 8, resolution: 16, in_channels: 3, out_ch: 3, ch: 32,
               ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0}
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_conditional: false, disc_in_channels: 3, disc_start: 250001, disc_weight: 0.8, codebook_weight: 1.0}
"""


def run_script(module, argv):
    """module.main() with argv, in this process; returns the run's metrics.json."""
    run_in_process(module, argv)
    out = argv[argv.index('--out') + 1] if '--out' in argv else None
    if out is None:
        return None
    with open(os.path.join(out, 'metrics.json')) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Layouts: DALLE-pytorch vae.pt, taming VQGAN
# ----------------------------------------------------------------------------------------------
def test_discrete_vae_layout_equals_dalle_pytorch(tmp_path):
    ours = models.DiscreteVAE(**DP_VAE_HPARAMS)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == DP_VAE_LAYOUT
    # a DALLE-pytorch vae.pt: {'hparams', 'weights'} in its layout, as its train_vae.py saves it
    torch.manual_seed(0)
    weights = {k: torch.randn(s) for k, s in DP_VAE_LAYOUT}
    torch.save(
        {'hparams': {**DP_VAE_HPARAMS, 'channels': 3}, 'weights': weights}, tmp_path / 'vae.pt'
    )
    vae = models.load_discrete_vae(str(tmp_path / 'vae.pt'))
    assert all(torch.equal(vae.state_dict()[k], w) for k, w in weights.items())
    idx = vae.get_codebook_indices(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert idx.shape == (2, 16) and int(idx.max()) < 16
    assert vae.decode(idx).shape == (2, 3, 16, 16)
    torch.save(
        {'hparams': DP_VAE_HPARAMS, 'weights': {**weights, 'extra.weight': torch.zeros(1)}},
        tmp_path / 'bad.pt',
    )
    with pytest.raises(utils.UserError, match='do not match'):
        models.load_discrete_vae(str(tmp_path / 'bad.pt'))


def test_vqgan_keys_equal_taming_f16_1024():
    with open(os.path.join(ROOT, 'tests', 'data', 'vqgan_imagenet_f16_1024_keys.txt')) as f:
        expected = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    dd = dict(
        double_z=False,
        z_channels=256,
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=128,
        ch_mult=[1, 1, 2, 2, 4],
        num_res_blocks=2,
        attn_resolutions=[16],
        dropout=0.0,
    )
    with torch.device('meta'):
        vq = models.VQGAN(dd, 1024, 256)
    sd = vq.state_dict()
    assert sorted(f'{k} {tuple(v.shape)}' for k, v in sd.items()) == sorted(expected)
    assert sum(v.numel() for v in sd.values()) == 72141699 and vq.fmap_size == 16


def write_tiny_vqgan(folder, extra_key=None):
    """model.yaml + a Lightning-style last.ckpt ({'state_dict'} with the loss's keys) of a tiny VQGAN."""
    cfg = folder / 'model.yaml'
    cfg.write_text(TINY_VQGAN_YAML)
    torch.manual_seed(0)
    ddconfig, n_embed, embed_dim = models.read_vqgan_config(str(cfg))
    sd = models.VQGAN(ddconfig, n_embed, embed_dim).state_dict()
    sd['loss.discriminator.main.0.weight'] = torch.zeros(2)
    if extra_key:
        sd[extra_key] = torch.zeros(1)
    torch.save({'state_dict': sd, 'global_step': 10, 'epoch': 1}, folder / 'last.ckpt')
    return str(folder / 'last.ckpt'), str(cfg)


def test_vqgan_loads_strict(tmp_path):
    ckpt, cfg = write_tiny_vqgan(tmp_path)
    vq = models.load_vqgan(ckpt, cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = vq.get_codebook_indices(x)
    assert idx.shape == (2, 64) and vq.decode(idx).shape == (2, 3, 16, 16)
    ckpt2, _ = write_tiny_vqgan(tmp_path, extra_key='encoder.unexpected.weight')
    with pytest.raises(utils.UserError, match='does not match'):
        models.load_vqgan(ckpt2, cfg)


# ----------------------------------------------------------------------------------------------
# DALLE: loss masking, KV-cache sampling, top-k over image tokens
# ----------------------------------------------------------------------------------------------
def tiny_dalle(seed=0):
    torch.manual_seed(seed)
    return (
        models.DALLE(
            num_text_tokens=50,
            text_seq_len=8,
            num_image_tokens=30,
            image_fmap_size=4,
            dim=32,
            depth=2,
            heads=2,
            dim_head=16,
        )
        .double()
        .eval()
    )


def test_loss_equals_masked_joint_vocabulary_cross_entropy():
    dalle = tiny_dalle()
    text = torch.randint(1, 50, (3, 8))
    text[:, 5:] = 0
    image = torch.randint(0, 30, (3, 16))
    loss, lt, li = dalle(text, image)
    logits, tb = dalle.masked_logits(text, image)
    T = dalle.text_seq_len
    # text positions give no probability to image ids and vice versa
    p = logits.softmax(-1)
    assert (
        p[:, :T, dalle.num_text_tokens :].max() == 0
        and p[:, T:, : dalle.num_text_tokens].max() == 0
    )
    labels = torch.cat([tb[:, 1:], image + dalle.num_text_tokens], 1)
    ref_t = F.cross_entropy(logits[:, :T].flatten(0, 1), labels[:, :T].flatten())
    ref_i = F.cross_entropy(logits[:, T:].flatten(0, 1), labels[:, T:].flatten())
    assert torch.allclose(lt.double(), ref_t, atol=1e-5) and torch.allclose(
        li.double(), ref_i, atol=1e-5
    )
    assert torch.allclose(loss.double(), (ref_t + 7 * ref_i) / 8, atol=1e-5)
    # padding gets a distinct id per position, predicted like any text token
    assert tb[0, 6:].tolist() == [dalle.num_text_tokens - 8 + i for i in range(5, 8)]


def test_kv_cache_sampling_equals_full_forward_sampling():
    dalle = tiny_dalle()
    text = torch.randint(1, 50, (3, 8))
    text[:, 6:] = 0
    for top_k in (0.9, 5, 0.0):
        a = dalle.generate_image_tokens(
            text, top_k, 1.0, torch.Generator().manual_seed(1), use_cache=True
        )
        b = dalle.generate_image_tokens(
            text, top_k, 1.0, torch.Generator().manual_seed(1), use_cache=False
        )
        assert torch.equal(a, b) and a.shape == (3, 16)
    assert len(set(a.flatten().tolist())) > 3  # really sampling, not a constant


def test_cpu_bf16_attention_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(models.causal_attention_matmul(q, k, v), want, atol=1e-5)
    attn = models.CausalSelfAttention(24, 3, 8)
    x = torch.randn(2, 40, 24)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = attn(x)  # the matmul path
    assert torch.allclose(got.float(), attn(x), atol=0.05)


def test_attention_dropout_is_on_the_output_as_dalle_pytorch():
    """attention.py: to_out = Sequential(Linear, Dropout(attn_dropout)): in training each output
    element is 0 or the no-dropout value / (1 - p); 'weights' drops attention probabilities."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 24)
    attn = models.CausalSelfAttention(24, 3, 8, dropout=0.5)
    assert attn.dropout_at == 'output'
    with torch.no_grad():
        clean = attn.eval()(x)
        y = attn.train()(x)
    kept = y != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(y[kept], clean[kept] / 0.5)
    other = models.CausalSelfAttention(24, 3, 8, dropout=0.5, dropout_at='weights')
    other.load_state_dict(attn.state_dict())
    with torch.no_grad():
        z = other.train()(x)
    assert (z != 0).all() and not torch.allclose(z, clean)  # the probabilities, not the output
    assert train_dalle.DEFAULTS['MODEL']['ATTN_DROPOUT_AT'] == 'output'
    dalle = models.DALLE(50, 8, 30, 4, dim=24, depth=1, heads=3, dim_head=8, attn_dropout=0.5)
    assert dalle.blocks[0].attn.dropout_at == dalle.hparams['attn_dropout_at'] == 'output'
    with pytest.raises(utils.UserError, match='ATTN_DROPOUT_AT'):
        models.CausalSelfAttention(24, 3, 8, dropout_at='probs')


@pytest.mark.parametrize('over,kept', [('image', 3), ('all', 8)])
def test_top_k_counts_the_vocabulary_it_is_told(over, kept):
    """thres 0.9 keeps int(0.1 * 30) = 3 of the 30 image tokens counted over the image vocabulary;
    over the joint vocabulary, as DALLE-pytorch counts, int(0.1 * (58 + 30)) = 8."""
    dalle = tiny_dalle()
    text = torch.randint(1, 50, (2, 8))
    out = dalle.generate_image_tokens(
        text, 0.9, 1e4, torch.Generator().manual_seed(0), use_cache=True, top_k_over=over
    )
    seen = set()
    for i in range(dalle.image_seq_len):
        with torch.no_grad():
            h = dalle.transformer(dalle.embed(dalle.text_with_bos(text), out[:, :i]))[:, -1]
            allowed = dalle.image_logits(h).topk(kept, dim=-1).indices
        assert (allowed == out[:, i : i + 1]).any(-1).all()
        seen |= {
            (tuple(a.tolist()), o.item()) for a, o in zip(allowed, out[:, i]) if o not in a[:3]
        }
    assert len(set(out.flatten().tolist())) > 3  # a hot temperature spreads over the allowed ones
    assert bool(seen) == (over == 'all')  # only the joint count draws beyond the best 3


def test_parameter_count_equals_dalle_pytorch_train_dalle():
    """56,392,872 = DALLE-pytorch 1.6.6 DALLE(dim 512, depth 8, heads 8, dim_head 64, text_seq_len 32,
    21,128 text tokens, 1024 image tokens on a 16x16 grid) with train_dalle.py's defaults (learned
    positional embeddings: no --rotary_emb, no --shift_tokens), VAE excluded; read off the package."""
    with torch.device('meta'):
        dalle = models.DALLE(21128, 32, 1024, 16, dim=512, depth=8, heads=8, dim_head=64)
    assert sum(p.numel() for p in dalle.parameters()) == 56392872


def test_amp_trains_in_bfloat16_and_fp16_needs_cuda():
    dalle = models.DALLE(20, 4, 16, 2, dim=16, depth=1, heads=2, dim_head=8)
    vae = models.DiscreteVAE(8, 16, 8, 2, 0, 8).eval()
    seen = []
    dalle.blocks[0].attn.to_qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    train_cfg = utils.to_cfg({**train_dalle.DEFAULTS['TRAIN'], 'AMP': True})
    amp, scaler = train_dalle.autocast(torch.device('cpu'), train_cfg)
    opt = utils.make_optimizer(dalle.parameters(), 1e-3)
    before = dalle.text_emb.weight.detach().clone()
    loss, _, _ = train_dalle.train_step(
        dalle,
        vae,
        opt,
        torch.rand(2, 3, 8, 8) * 2 - 1,
        torch.randint(1, 20, (2, 4)),
        train_cfg,
        amp,
    )
    assert seen == [torch.bfloat16] and torch.isfinite(loss) and scaler is None
    assert dalle.text_emb.weight.dtype == torch.float32 and not torch.equal(
        before, dalle.text_emb.weight
    )
    with pytest.raises(utils.UserError, match='needs CUDA'):
        train_dalle.autocast(
            torch.device('cpu'), utils.to_cfg({**train_cfg, 'AMP_DTYPE': 'float16'})
        )


# ----------------------------------------------------------------------------------------------
# DALLE-pytorch's dalle.pt (train_dalle.py save_model) into models.DALLE
# ----------------------------------------------------------------------------------------------
# train_dalle.py 1.6.6's dalle_params at the tiny sizes of tests/data/dalle_pytorch_1.6.6_tiny_keys.txt
DP_HPARAMS = dict(
    num_text_tokens=64,
    text_seq_len=8,
    dim=16,
    depth=2,
    heads=2,
    dim_head=8,
    reversible=False,
    loss_img_weight=7,
    attn_types=('full',),
    ff_dropout=0.0,
    attn_dropout=0.0,
    stable=False,
    shift_tokens=False,
    rotary_emb=False,
    shared_attn_ids=None,
    shared_ff_ids=None,
    share_input_output_emb=False,
)
DP_TEXT = [[5, 9, 17, 3, 40, 0, 0, 0], [60, 2, 33, 0, 0, 0, 0, 0], [1, 63, 12, 7, 8, 9, 10, 11]]
# DALLE-pytorch 1.6.6 itself on dalle_pytorch_checkpoint()'s weights: dalle(DP_TEXT, dp_images(),
# return_loss=True) and vae.get_codebook_indices(dp_images())[0]
DP_LOSS = 3.007211923599243
DP_CODES0 = [2, 2, 2, 2, 2, 4, 2, 2, 2, 2, 2, 2, 8, 8, 8, 8]


def dp_layout():
    with open(os.path.join(ROOT, 'tests', 'data', 'dalle_pytorch_1.6.6_tiny_keys.txt')) as f:
        rows = [line.split(' ', 1) for line in f if line.strip() and not line.startswith('#')]
    return [(k, tuple(int(x) for x in s.strip('()\n').split(',') if x.strip())) for k, s in rows]


def dp_images():
    """Three 16 px images in [0, 1], DALLE-pytorch's input range."""
    x = torch.sin(torch.arange(3 * 3 * 16 * 16, dtype=torch.float64) * 0.1)
    return (x.float().reshape(3, 3, 16, 16) * 0.5 + 0.5).clamp(0, 1)


# the 64-id vocabulary the DALLE-pytorch checkpoint below (and its expected loss) was made with
DALLE_PYTORCH_TEST_MERGES = ('r e', 're d</w>', 'c i', 'ci r')


def dalle_pytorch_checkpoint(path=None, layout=None, **top):
    """A dalle.pt as DALLE-pytorch 1.6.6's train_dalle.py save_model writes it: hparams,
    vae_params (its train_vae.py's), epoch, version, vae_class_name, weights (dalle.state_dict(),
    VAE included, in its order), the Adam (lr 3e-4) over DALLE.parameters() without the VAE after
    two steps, a ReduceLROnPlateau stepped once. Weights are fixed functions of their index."""
    layout = layout or dp_layout()
    weights = collections.OrderedDict(
        (
            k,
            (torch.sin(torch.arange(math.prod(s), dtype=torch.float64) * 0.37 + i) * 0.2)
            .float()
            .reshape(s),
        )
        for i, (k, s) in enumerate(layout)
    )
    trainable = [k for k, _ in layout if not k.startswith('vae.')]
    params = [weights[k].clone().requires_grad_() for k in trainable]
    opt = torch.optim.Adam(params, lr=3e-4)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode='min', factor=0.5, patience=10, cooldown=10, min_lr=1e-6
    )
    for _ in range(2):
        sum((p * p).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    sched.step(1.0)
    weights.update((k, p.detach().clone()) for k, p in zip(trainable, params))
    obj = {
        'hparams': dict(DP_HPARAMS),
        'vae_params': {**DP_VAE_HPARAMS, 'channels': 3},
        'epoch': 3,
        'version': '1.6.6',
        'vae_class_name': 'DiscreteVAE',
        'weights': weights,
        'opt_state': opt.state_dict(),
        'scheduler_state': sched.state_dict(),
        **top,
    }
    if path is not None:
        torch.save(obj, path)
    return obj


def load_dp(obj, tmp_path, **kw):
    """models.load_dalle_pytorch on obj as torch.load(weights_only=True) reads it back."""
    torch.save(obj, tmp_path / 'dp.pt')
    read = utils.load_weights(str(tmp_path / 'dp.pt'))
    bpe = str(tmp_path / 'bpe')
    write_clip_bpe(bpe, DALLE_PYTORCH_TEST_MERGES)
    return read, models.load_dalle_pytorch(read, 'dp.pt', 'cpu', 'clip', bpe, **kw)


def test_dalle_pytorch_checkpoint_gives_its_forward_and_adam_state(tmp_path):
    obj = dalle_pytorch_checkpoint()
    read, (dalle, vae, tok) = load_dp(obj, tmp_path)
    # SimpleTokenizer's raw ids, 64 of them as num_text_tokens ('a</w>' is BPE id 29)
    assert tok.vocab_size == 64 and tok.encode('a') == [29]
    dalle.eval()
    with torch.no_grad():
        codes = vae.get_codebook_indices(dp_images() * 2 - 1)
        loss = dalle(torch.tensor(DP_TEXT), codes)[0]
    assert codes[0].tolist() == DP_CODES0
    assert loss.item() == pytest.approx(DP_LOSS, abs=1e-5)
    w = obj['weights']
    assert torch.equal(dalle.blocks[1].scale_ff, w['transformer.layers.layers.1.1.scale'].flatten())
    assert torch.equal(dalle.image_pos_row, w['image_pos_emb.weights_0'][0, :, 0])
    assert torch.equal(dalle.image_pos_col, w['image_pos_emb.weights_1'][0, 0])
    assert torch.equal(dalle.norm_out.bias, w['to_logits.0.bias'])
    # its Adam: moments by name, the saved lr, our fused kernel kept
    opt = utils.make_optimizer(dalle.parameters(), 1.0)
    opt.load_state_dict(models.dalle_pytorch_optimizer_state(read, dalle, opt, 'dp.pt'))
    assert opt.param_groups[0]['lr'] == 3e-4 and opt.param_groups[0]['fused']
    theirs = [k for k, _ in dp_layout() if not k.startswith('vae.')]
    for key, param in (
        ('image_pos_emb.weights_1', dalle.image_pos_col),
        ('transformer.layers.layers.0.0.scale', dalle.blocks[0].scale_attn),
        ('image_emb.weight', dalle.image_emb.weight),
    ):
        saved = obj['opt_state']['state'][theirs.index(key)]
        assert torch.equal(opt.state[param]['exp_avg'], saved['exp_avg'].reshape(param.shape))
        assert float(opt.state[param]['step']) == 2
    # axial_positional_embedding >= 0.3 stores weights.0 / weights.1 (an nn.ParameterList)
    renamed = {k.replace('weights_', 'weights.'): v for k, v in obj['weights'].items()}
    _, (d2, _, _) = load_dp({**obj, 'weights': renamed}, tmp_path)
    assert torch.equal(d2.image_pos_col, dalle.image_pos_col)
    # text2img's copy (1.5.1) has text_seq_len + 2 position rows; the last is never read
    t2i = dict(obj['weights'])
    t2i['text_pos_emb.weight'] = torch.cat([t2i['text_pos_emb.weight'], torch.ones(1, 16)])
    _, (d3, _, _) = load_dp({**obj, 'weights': t2i}, tmp_path)
    assert torch.equal(d3.text_pos_emb.weight, dalle.text_pos_emb.weight)


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


DP_BAD = {
    'unmapped weight': (
        lambda o: {
            **o,
            'weights': {
                **o['weights'],
                'transformer.layers.layers.0.0.fn.fn.to_qkv.weight': torch.zeros(48, 16),
            },
        },
        "weights key 'transformer.layers.layers.0.0.fn.fn.to_qkv.weight' maps to no models.DALLE weight",
    ),
    'missing weight': (
        lambda o: {**o, 'weights': _without(o['weights'], 'to_logits.1.bias')},
        'lack the DALLE-pytorch counterpart of to_logits.bias',
    ),
    'grid of another size': (
        lambda o: {
            **o,
            'weights': {**o['weights'], 'image_pos_emb.weights_0': torch.zeros(1, 8, 1, 16)},
        },
        "weights key 'image_pos_emb.weights_0' has shape (1, 8, 1, 16), expected (1, 4, 1, 16)",
    ),
    'rotary': (
        lambda o: {**o, 'hparams': {**o['hparams'], 'rotary_emb': True}},
        'hparams rotary_emb=True is not supported',
    ),
    'shift_tokens left to its default': (
        lambda o: {**o, 'hparams': _without(o['hparams'], 'shift_tokens')},
        'hparams shift_tokens=True is not supported',
    ),
    'sparse attention': (
        lambda o: {**o, 'hparams': {**o['hparams'], 'attn_types': ('full', 'axial_row')}},
        "attn_types=('full', 'axial_row') is not supported",
    ),
    'unknown hparam': (
        lambda o: {**o, 'hparams': {**o['hparams'], 'ff_mult': 2}},
        "hparams ['ff_mult'] are not DALLE-pytorch DALLE arguments",
    ),
    'other vocabulary': (
        lambda o: {**o, 'hparams': {**o['hparams'], 'num_text_tokens': 65}},
        'num_text_tokens=65, but the clip tokenizer',
    ),
    'vae normalization off': (
        lambda o: {**o, 'vae_params': {**o['vae_params'], 'normalization': None}},
        'normalization=None',
    ),
    'vae weight unknown': (
        lambda o: {**o, 'weights': {**o['weights'], 'vae.extra.weight': torch.zeros(1)}},
        "its 'vae.' weights do not fit its DiscreteVAE",
    ),
    'vqgan without its config': (
        lambda o: {**o, 'vae_params': None, 'vae_class_name': 'VQGanVAE'},
        'give its taming model.yaml as --vqgan_config_path',
    ),
    'openai vae': (
        lambda o: {**o, 'vae_params': None, 'vae_class_name': 'OpenAIDiscreteVAE'},
        "vae_class_name 'OpenAIDiscreteVAE' is not supported",
    ),
    'deepspeed placeholder': (
        lambda o: {
            **o,
            'weights': 'To get a working standard checkpoint, look into consolidating DeepSpeed checkpoints.',
        },
        "DeepSpeed's placeholder",
    ),
}


@pytest.mark.parametrize('case', sorted(DP_BAD))
def test_dalle_pytorch_checkpoint_bad_input_names_the_key(case, tmp_path):
    change, message = DP_BAD[case]
    with pytest.raises(utils.UserError, match=re.escape(message)):
        load_dp(change(dalle_pytorch_checkpoint()), tmp_path)


def test_dalle_pytorch_optimizer_state_must_fit(tmp_path):
    obj = dalle_pytorch_checkpoint()
    read, (dalle, _, _) = load_dp(obj, tmp_path)
    opt = utils.make_optimizer(dalle.parameters(), 1.0)
    state = obj['opt_state']
    short = {**state, 'param_groups': [{**state['param_groups'][0], 'params': list(range(30))}]}
    with pytest.raises(
        utils.UserError, match='opt_state has 1 groups of 30 parameters.*one group of 35'
    ):
        models.dalle_pytorch_optimizer_state({**read, 'opt_state': short}, dalle, opt, 'dp.pt')
    assert (
        models.dalle_pytorch_optimizer_state({**read, 'opt_state': None}, dalle, opt, 'dp.pt')
        is None
    )


# a VQGAN whose 256 px images make the 16x16 grid DALLE-pytorch's VQGanVAE assumes (its
# image_size is 256, its num_layers log2(resolution / attn_resolutions[0]))
DP_VQGAN_YAML = (
    TINY_VQGAN_YAML.replace('resolution: 16', 'resolution: 256')
    .replace('ch_mult: [1, 2]', 'ch_mult: [1, 1, 1, 1, 1]')
    .replace('attn_resolutions: [8]', 'attn_resolutions: [16]')
)


def test_dalle_pytorch_checkpoint_with_its_vqgan(tmp_path):
    """vae_class_name VQGanVAE: no vae_params; the VQModel's weights under 'vae.model.' (the
    loss's dropped), its architecture from the config given with --vqgan_config_path."""
    (tmp_path / 'model.yaml').write_text(DP_VQGAN_YAML)
    vq = models.VQGAN(*models.read_vqgan_config(str(tmp_path / 'model.yaml')))
    assert vq.fmap_size == 16 and vq.image_size == 256
    torch.manual_seed(0)
    vq_state = {
        k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in vq.state_dict().items()
    }
    layout = []
    for k, s in dp_layout():
        if k.startswith('vae.'):
            continue
        if k.startswith('image_pos_emb.weights_0'):
            s = (1, 16, 1, 16)
        elif k.startswith('image_pos_emb.weights_1'):
            s = (1, 1, 16, 16)
        elif k == 'image_emb.weight':
            s = (16, 16)  # n_embed 16
        layout.append((k, s))
    obj = dalle_pytorch_checkpoint(layout=layout, vae_params=None, vae_class_name='VQGanVAE')
    obj['weights'].update({f'vae.model.{k}': v for k, v in vq_state.items()})
    obj['weights']['vae.model.loss.discriminator.main.0.weight'] = torch.zeros(64, 3, 4, 4)
    obj['weights']['vae.model.loss.perceptual_loss.scaling_layer.shift'] = torch.zeros(1, 3, 1, 1)
    _, (dalle, vae, _) = load_dp(obj, tmp_path, vqgan_config_path=str(tmp_path / 'model.yaml'))
    assert isinstance(vae, models.VQGAN) and dalle.image_seq_len == 256
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in vq_state.items())
    # a VQGAN of another grid than the DALLE's: one line naming the position weights
    (tmp_path / 'small.yaml').write_text(TINY_VQGAN_YAML)
    small = models.VQGAN(*models.read_vqgan_config(str(tmp_path / 'small.yaml'))).state_dict()
    obj['weights'] = {k: v for k, v in obj['weights'].items() if not k.startswith('vae.model.')}
    obj['weights'].update({f'vae.model.{k}': v for k, v in small.items()})
    with pytest.raises(
        utils.UserError,
        match=r"image_pos_emb.weights_0' has shape \(1, 16, 1, 16\), expected \(1, 8, 1, 16\)",
    ):
        load_dp(obj, tmp_path, vqgan_config_path=str(tmp_path / 'small.yaml'))


# ----------------------------------------------------------------------------------------------
# Scripts on the tiny shapes data
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def nested_images(tmp_path_factory, tiny_shapes):
    """The tiny images at mixed depths, no class-folder structure."""
    root = tmp_path_factory.mktemp('imgs')
    for i, p in enumerate(
        utils.list_images(os.path.join(tiny_shapes, 'CUB_200_2011', 'images'))[:32]
    ):
        d = root / ('a' if i % 2 else 'b/c/d') if i % 3 else root
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / f'{i}.jpg')
    return str(root)


VAE_ARGS = [
    '--image_size',
    16,
    '--num_layers',
    2,
    '--num_tokens',
    16,
    '--emb_dim',
    8,
    '--hidden_dim',
    8,
    '--num_resnet_blocks',
    1,
    '--batch_size',
    8,
    '--set',
    'WORKERS=0',
    '--set',
    'TRAIN.LOG_EVERY=2',
]


@pytest.mark.slow
def test_train_vae_smoke_and_mid_epoch_resume(nested_images, tmp_path, tiny_shapes, tiny_judge):
    a = tmp_path / 'a'
    m = run_script(
        train_vae,
        [
            '--image_folder',
            nested_images,
            '--epochs',
            2,
            '--out',
            a,
            *VAE_ARGS,
            '--set',
            'TRAIN.SAVE_EVERY_N_STEPS=2',
            '--set',
            'TRAIN.KEEP_CHECKPOINTS=0',
            '--set',
            'TRAIN.ANNEAL_RATE=0.01',
            '--set',
            'TRAIN.LR_DECAY_EVERY=2',
            '--set',
            f'EVAL.HOLDOUT={tiny_shapes}/test.jsonl',
            '--set',
            f'EVAL.JUDGE={tiny_judge}',
        ],
    )
    assert (
        m['train_steps'] == 8 and m['final_temp'] < 1.0
    )  # compounded after batches 0 and 2 of each epoch
    assert m['holdout_images'] == 20 and os.path.isfile(a / 'holdout_recon.png')
    for attr in (
        'colour',
        'shape',
        'size',
    ):  # judge on originals, reconstructions, one colour per token
        assert all(0 <= m[f'judge_{w}_{attr}'] <= 1 for w in ('original', 'recon', 'token_average'))
    assert 0 < m['final_perplexity'] and 0 < m['final_codes_used'] <= 1
    dp = torch.load(a / 'vae.pt', weights_only=True)  # what DALLE-pytorch's train_dalle reads
    assert set(dp) == {'hparams', 'weights'} and dp['hparams']['num_tokens'] == 16
    assert [(k, tuple(v.shape)) for k, v in dp['weights'].items()] == DP_VAE_LAYOUT
    assert os.path.isfile(a / 'vae-final.pt') and os.listdir(a / 'tb')
    # resume from step 2 (mid-epoch 0) -> the same weights as the uninterrupted run
    b = tmp_path / 'b'
    run_script(
        train_vae,
        [
            '--image_folder',
            nested_images,
            '--epochs',
            2,
            '--out',
            b,
            *VAE_ARGS,
            '--set',
            'TRAIN.ANNEAL_RATE=0.01',
            '--set',
            'TRAIN.LR_DECAY_EVERY=2',
            '--resume',
            a / 'checkpoints' / 'vae_00000002.pt',
        ],
    )
    wa, wb = (torch.load(p / 'vae.pt', weights_only=True)['weights'] for p in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_vae_holdout_judge_scores_are_the_shared_judge_accuracy(tiny_shapes, tmp_path):
    """train_vae's judge_* of originals, reconstructions and token averages are the values
    utils.judge_accuracy gives those images (the scoring every generator's images get)."""
    torch.manual_seed(2)
    judge = models.ShapesJudge(**TINY_JUDGE)
    for m in judge.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(0.01)  # a random judge whose verdicts vary with the image
    save_tiny_judge(tmp_path, judge, tiny_shapes)
    torch.manual_seed(0)
    vae = models.DiscreteVAE(**DP_VAE_HPARAMS)
    cfg = utils.to_cfg({**utils.COMMON_DEFAULTS, **train_vae.DEFAULTS})
    cfg.MODEL.IMAGE_SIZE = 16
    cfg.EVAL.HOLDOUT, cfg.EVAL.JUDGE = f'{tiny_shapes}/test.jsonl', str(tmp_path)
    m = train_vae.evaluate(cfg, vae, torch.device('cpu'), utils.get_logger(None, 'vae'))
    # the reference: the judge called directly on the same three sets of images
    paths = train_vae.holdout_paths(cfg.EVAL.HOLDOUT)
    ds = utils.PairDataset([(p, '') for p in paths], train_vae.image_transform(16))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        recon = vae.decode(vae.get_codebook_indices(x)).clamp(-1, 1)
    grid = F.interpolate(
        F.interpolate(x, size=vae.fmap_size, mode='area'),
        size=16,
        mode='bilinear',
        align_corners=False,
    )
    j, keys = models.load_judge(str(tmp_path)), [utils.shapes_key(p) for p in paths]
    ref = {
        name: utils.judge_accuracy(j, images, keys)
        for name, images in (('original', x), ('recon', recon), ('token_average', grid))
    }
    for name, acc in ref.items():
        for k, v in acc.items():
            assert m[f'judge_{name}_{k}'] == v, (name, k)
            if name != 'original':
                assert m[f'judge_{name}_ratio_{k}'] == v / max(ref['original'][k], 1e-8)
    assert len([k for k in m if k.startswith('judge_')]) == 5 * len(ref['original']) + 1
    assert len({m[f'judge_{n}_colour'] for n in ref}) > 1  # the three sets score differently
    protocol = m['judge_protocol']
    assert protocol['num_images'] == len(paths) == 20 and protocol['split'] == cfg.EVAL.HOLDOUT
    assert protocol['weights']['judge']['path'] == j.weights_path


def original_vae_schedule(epochs, steps_per_epoch, every, rate, start, temp_min, lr_rate):
    """DALLE-pytorch / text2img train_vae.py's loop: the temperature and LR factor each step
    uses; after the step on batch i, `if i % every == 0` anneals with global_step and decays."""
    temp, lr, global_step, used = start, 1.0, 0, []
    for _ in range(epochs):
        for i in range(steps_per_epoch):
            used.append((temp, lr))
            if i % every == 0:
                temp = max(temp * math.exp(-rate * global_step), temp_min)
                lr *= lr_rate
            global_step += 1
    return used


@pytest.mark.parametrize('steps_per_epoch, every', [(100, 7), (45, 10), (12, 4), (9, 20)])
def test_vae_temperature_and_lr_decay_at_the_original_points(steps_per_epoch, every):
    """The decay points restart with each epoch and include its first batch; the compound
    temperature's closed form equals the original's loop at every step."""
    train_cfg = utils.to_cfg({**train_vae.DEFAULTS['TRAIN'], 'ANNEAL_RATE': 3e-5})
    assert train_cfg.LR_DECAY_COUNTER == 'epoch' and train_cfg.TEMP_SCHEDULE == 'compound'
    epochs = 4
    want = original_vae_schedule(
        epochs, steps_per_epoch, every, 3e-5, 1.0, train_cfg.TEMP_MIN, train_cfg.LR_DECAY_RATE
    )
    lr, step = 1.0, 0
    for _ in range(epochs):
        for i in range(steps_per_epoch):
            temp = train_vae.temperature(train_cfg, step, every, steps_per_epoch)
            assert (temp, lr) == pytest.approx(want[step], rel=1e-9), step
            step += 1
            if train_vae.is_decay_point(train_cfg, every, i, step):
                lr *= train_cfg.LR_DECAY_RATE


def test_vae_decay_interval_of_text2img_and_the_global_option():
    """text2img train_vae.py: `i % int(len(ds)/4/BATCH_SIZE)`; 'global' keeps every
    LR_DECAY_EVERY-th step of the run, temp <- max(temp * exp(-rate * steps done), min) there."""
    cfg = utils.to_cfg({**train_vae.DEFAULTS['TRAIN'], 'BATCH_SIZE': 64, 'LR_DECAY_PER_EPOCH': 4})
    assert train_vae.decay_interval(cfg, 45975) == 179
    with pytest.raises(utils.UserError, match='LR_DECAY_PER_EPOCH'):
        train_vae.decay_interval(cfg, 255)
    cfg.LR_DECAY_PER_EPOCH = 0
    assert train_vae.decay_interval(cfg, 45975) == 100
    args = utils.base_parser('t').parse_args(
        ['--cfg', os.path.join(ROOT, 'cfg/dalle/wukong_vae.yml')]
    )
    wukong = utils.build_cfg(train_vae.DEFAULTS, args).TRAIN  # text2img's README command
    assert (wukong.LR_DECAY_PER_EPOCH, wukong.LR_DECAY_COUNTER, wukong.KL_REDUCTION) == (
        4,
        'epoch',
        'sum',
    )
    cfg.update(LR_DECAY_COUNTER='global', ANNEAL_RATE=1e-4)
    temp = cfg.STARTING_TEMP
    for step in range(1, 400):
        if train_vae.is_decay_point(cfg, 10, 0, step):
            assert step % 10 == 0
            temp = max(temp * math.exp(-cfg.ANNEAL_RATE * step), cfg.TEMP_MIN)
        assert train_vae.temperature(cfg, step, 10, 37) == pytest.approx(temp, rel=1e-12)
    assert temp == cfg.TEMP_MIN
    cfg.TEMP_SCHEDULE = 'exponential'
    assert train_vae.temperature(cfg, 100, 10, 37) == pytest.approx(math.exp(-1e-2))
    cfg.TEMP_SCHEDULE = 'cosine'
    with pytest.raises(utils.UserError, match="TEMP_SCHEDULE='cosine'"):
        train_vae.temperature(cfg, 1, 10, 37)
    cfg.LR_DECAY_COUNTER = 'run'
    with pytest.raises(utils.UserError, match="LR_DECAY_COUNTER='run'"):
        train_vae.is_decay_point(cfg, 10, 0, 1)


@pytest.mark.parametrize('counter, decays', [('epoch', 4), ('global', 2)])
def test_train_vae_decays_the_lr_at_the_counted_points(nested_images, tmp_path, counter, decays):
    """32 images in batches of 8, 2 epochs, every 3 batches: the original's points are batches
    0 and 3 of each epoch (4 decays); 'global' decays after steps 3 and 6."""
    m = run_script(
        train_vae,
        [
            '--image_folder',
            nested_images,
            '--epochs',
            2,
            '--out',
            tmp_path,
            *VAE_ARGS,
            '--set',
            'TRAIN.LR_DECAY_EVERY=3',
            '--set',
            f'TRAIN.LR_DECAY_COUNTER={counter}',
        ],
    )
    assert m['train_steps'] == 8
    assert m['final_lr'] == pytest.approx(1e-3 * 0.98**decays, rel=1e-9)


def test_vae_kl_is_dalle_pytorchs_sum():
    """DiscreteVAE.forward: F.kl_div(log_uniform, log_qy, None, None, 'batchmean',
    log_target=True) with log_uniform of shape (1,), so 'batchmean' divides by 1: the KL summed
    over batch, positions and codes; KL_REDUCTION batchmean divides by the batch."""
    torch.manual_seed(0)
    logits = torch.randn(3, 16, 4, 4)
    log_qy = F.log_softmax(logits.flatten(2).transpose(1, 2), dim=-1)
    log_uniform = torch.log(torch.tensor([1.0 / 16]))
    want = F.kl_div(log_uniform, log_qy, None, None, 'batchmean', log_target=True)
    by_hand = (log_qy.exp() * (log_qy - math.log(1 / 16))).sum()
    assert want.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert train_vae.DEFAULTS['TRAIN']['KL_REDUCTION'] == 'sum'
    assert train_vae.kl_to_uniform(logits).item() == pytest.approx(want.item(), rel=1e-6)
    assert train_vae.kl_to_uniform(logits, 'batchmean').item() == pytest.approx(
        want.item() / 3, rel=1e-6
    )
    train_cfg = utils.to_cfg({**train_vae.DEFAULTS['TRAIN'], 'KL_LOSS_WEIGHT': 0.5})
    images = torch.zeros(3, 3, 16, 16)
    loss, rec, kl = train_vae.vae_loss(images, images + 0.1, logits, train_cfg)
    assert loss.item() == pytest.approx(0.01 + 0.5 * want.item(), rel=1e-5)


@pytest.mark.slow
def test_train_vae_code_restarts_resume_exactly(nested_images, tmp_path):
    # codes re-pointed at steps 4 and 8 from the histogram since the last log; the checkpoint at 6
    # falls inside a window, so a resume must carry the histogram to restart the same codes
    args = [
        *VAE_ARGS,
        '--epochs',
        2,
        '--set',
        'TRAIN.LOG_EVERY=4',
        '--set',
        'TRAIN.RESTART_DEAD_CODES=true',
        '--set',
        'TRAIN.LOGIT_INIT_SCALE=10.0',
    ]
    a, b = tmp_path / 'a', tmp_path / 'b'
    m = run_script(
        train_vae,
        [
            '--image_folder',
            nested_images,
            '--out',
            a,
            *args,
            '--set',
            'TRAIN.SAVE_EVERY_N_STEPS=2',
            '--set',
            'TRAIN.KEEP_CHECKPOINTS=0',
        ],
    )
    assert m['final_restarted'] > 0
    run_script(
        train_vae,
        [
            '--image_folder',
            nested_images,
            '--out',
            b,
            *args,
            '--resume',
            a / 'checkpoints' / 'vae_00000006.pt',
        ],
    )
    wa, wb = (torch.load(p / 'vae.pt', weights_only=True)['weights'] for p in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dead_code_restarts_split_the_busy_code():
    torch.manual_seed(0)
    vae = models.DiscreteVAE(16, 32, 8, 2, 1, 8)
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        vae.encoder[-1].bias[0] += 1e3  # code 0 wins everywhere: the collapse
    assert vae.get_codebook_indices(x).unique().tolist() == [0]
    recon = vae.decode(vae.get_codebook_indices(x))
    n = train_vae.restart_dead_codes(vae, x, torch.arange(32) > 0, 10.0)
    assert n == 31 and torch.equal(vae.codebook.weight[1:], vae.codebook.weight[:1].expand(31, -1))
    assert (
        len(vae.get_codebook_indices(x).unique()) > 8
    )  # the split codes each took some positions...
    assert torch.allclose(
        vae.decode(vae.get_codebook_indices(x)), recon
    )  # ...with the parent's vector


def test_dead_code_restarts_seed_where_reconstruction_fails():
    """Restarted codes start at features of badly reconstructed tokens: none from an image the
    VAE already reconstructs exactly."""
    torch.manual_seed(0)
    vae = models.DiscreteVAE(32, 32, 8, 2, 1, 8)  # 8x8 tokens per image
    with torch.no_grad():
        vae.encoder[-1].bias[0] += 1e3  # code 0 everywhere
        exact = vae.decode(torch.zeros(1, 64, dtype=torch.long))  # decodes to itself: zero error
    x = torch.cat([exact, torch.rand(1, 3, 32, 32) * 2 - 1])
    w0 = vae.encoder[-1].weight[0].flatten().clone()
    assert train_vae.restart_dead_codes(vae, x, torch.arange(32) >= 24, 10.0) == 8
    with torch.no_grad():
        feats = F.normalize(
            vae.encoder[:-1](x).permute(0, 2, 3, 1).flatten(1, 2), dim=-1
        )  # (2, 64, C)
    h0 = F.normalize(
        vae.encoder[-1].weight[24:].flatten(1) - w0, dim=-1
    )  # each restart's h0 direction
    best = (h0 @ feats.transpose(1, 2)).amax(2)  # (2, 8): best match in each image
    assert torch.allclose(best[1], torch.ones(8), atol=1e-4)  # all from the image it fails on
    assert (best[0] < 1 - 1e-3).all()


def test_vq_quantizer_is_the_nearest_code_straight_through():
    """MODEL.QUANTIZER vq (VQ-VAE, van den Oord et al. 2017 Eq. 3): the decoder reads each
    encoder output's nearest code, the reconstruction's gradient reaches the encoder unchanged,
    and the VQ loss is ||sg[z_e] - e||^2 + 0.25 ||z_e - sg[e]||^2."""
    torch.manual_seed(0)
    vae = models.DiscreteVAE(16, 32, 8, 2, 1, 8, quantizer='vq')
    assert vae.encoder[-1].out_channels == 8 and vae.hparams['quantizer'] == 'vq'
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    recon, logits, vq = vae(x)
    z_e = vae.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8)
    nearest = (z_e[:, None] - vae.codebook.weight[None]).pow(2).sum(-1).argmin(1)
    assert torch.equal(logits.argmax(1).flatten(), nearest)
    assert torch.equal(vae.get_codebook_indices(x).flatten(), nearest)
    assert torch.allclose(recon, vae.decode(nearest.view(4, 16)), atol=1e-5)
    e = vae.codebook.weight[nearest]
    assert vq.item() == pytest.approx(1.25 * (e - z_e).pow(2).mean().item(), rel=1e-5)
    # straight-through: the encoder's gradient from the reconstruction is the decoder input's
    vae.zero_grad()
    recon.sum().backward()
    assert vae.encoder[-1].weight.grad.abs().sum() > 0 and vae.codebook.weight.grad is None
    # the Gumbel VAE's vae.pt keeps DALLE-pytorch's hparams: no quantizer key
    assert 'quantizer' not in models.DiscreteVAE(16, 32, 8, 2, 1, 8).hparams


def test_nearest_codes_are_the_float32_ones_under_bf16_autocast():
    """The VQ distances run in float32 inside autocast: bf16's |z|^2 - 2 z.e + |e|^2 picks
    other codes for many tokens."""
    torch.manual_seed(0)
    vae = models.DiscreteVAE(16, 256, 32, 2, 1, 8, quantizer='vq')
    # encoder outputs and codes near one large vector, as a trained codebook's clusters
    z_e = 10 + 0.3 * torch.randn(16, 32, 4, 4)
    vae.codebook.weight.data = 10 + 0.3 * torch.randn(256, 32)
    quant = models.VectorQuantizer(256, 32)
    quant.embedding.weight.data = vae.codebook.weight.data.clone()
    plain = vae.code_distances(z_e).argmin(-1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(vae.code_distances(z_e).argmin(-1), plain)
        assert torch.equal(quant.indices(z_e), plain.flatten(1))
    with torch.autocast('cpu', dtype=torch.bfloat16):  # what the expanded form gives in bf16
        flat, book = z_e.permute(0, 2, 3, 1), vae.codebook.weight
        bf16 = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(-1)
    assert (bf16.argmin(-1) != plain).float().mean() > 0.1


@pytest.mark.slow
def test_train_vae_vq_writes_a_vae_pt_that_dalle_reads(nested_images, tmp_path):
    m = run_script(
        train_vae,
        ['--image_folder', nested_images, '--epochs', 1, '--out', tmp_path, *VAE_ARGS]
        + ['--set', 'MODEL.QUANTIZER=vq', '--set', 'TRAIN.RESTART_DEAD_CODES=true'],
    )
    assert m['final_vq'] > 0 and 'final_temp' not in m and 'final_kl' not in m
    vae = models.load_discrete_vae(str(tmp_path / 'vae.pt'))
    assert vae.quantizer == 'vq' and vae.encoder[-1].out_channels == 8
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z_e = vae.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8)
    nearest = (z_e[:, None] - vae.codebook.weight[None]).pow(2).sum(-1).argmin(1)
    assert torch.equal(vae.get_codebook_indices(x).flatten(), nearest)


def test_vq_dead_codes_restart_at_encoder_outputs_where_reconstruction_fails():
    torch.manual_seed(0)
    vae = models.DiscreteVAE(32, 32, 8, 2, 1, 8, quantizer='vq')
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    dead = torch.arange(32) >= 28
    kept = vae.codebook.weight[:28].clone()
    assert train_vae.restart_dead_codes(vae, x, dead, 1.0) == 4
    with torch.no_grad():
        z_e = vae.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(vae.codebook.weight[:28], kept)
    gap = (vae.codebook.weight[28:, None] - z_e[None]).abs().amax(-1).amin(1)
    assert gap.max() < 1e-6  # each restarted code is one of the encoder outputs


def _dense_reference(vae, x, temp, hard, reinmax):
    """The textbook formulas on dense one-hots (DALLE-pytorch's einsum), with the noise the
    model draws: F.gumbel_softmax's straight-through and ReinMax (Liu et al. 2023, Alg. 2)."""
    logits = vae.encoder(x)
    lg = logits.permute(0, 2, 3, 1)
    g = -torch.log(-torch.log(torch.rand(lg.shape).clamp(1e-20, 1.0)))
    soft = ((lg + g) / temp).softmax(-1)
    y = soft
    if hard:
        one_hot = F.one_hot((lg + g).argmax(-1), lg.shape[-1]).float()
        y = one_hot - soft.detach() + soft
        if reinmax:
            pi0 = lg.softmax(-1)
            pi1 = (one_hot + (lg / temp).softmax(-1)) / 2
            pi1 = ((pi1.log() - lg).detach() + lg).softmax(-1)
            pi2 = 2 * pi1 - pi0 / 2
            y = one_hot + pi2 - pi2.detach()
    z = torch.einsum('bhwn,nd->bdhw', y, vae.codebook.weight)
    return vae.decoder(z)


@pytest.mark.parametrize('hard,reinmax', [(False, False), (True, False), (True, True)])
def test_vae_forward_equals_dense_gumbel_formulas(hard, reinmax):
    torch.manual_seed(0)
    vae = models.DiscreteVAE(16, 32, 8, 2, 1, 8)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    grads = []
    for fn in (
        lambda: vae(x, temperature=0.7, hard=hard, reinmax=reinmax)[0],
        lambda: _dense_reference(vae, x, 0.7, hard, reinmax),
    ):
        vae.zero_grad()
        torch.manual_seed(1)
        out = fn()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in vae.parameters()]))
    (a, ga), (b, gb) = grads
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.allclose(u, v, atol=1e-5, rtol=1e-4) for u, v in zip(ga, gb))


def test_vae_gumbel_codes_follow_the_softmax():
    """The uniform-based Gumbel sampler draws codes with the probabilities softmax(logits)."""
    torch.manual_seed(0)
    vae = models.DiscreteVAE(2, 4, 3, 1, 0, 4)
    for p in vae.parameters():
        p.requires_grad_(False)
    vae.encoder[-1].weight.zero_()
    vae.encoder[-1].bias.copy_(torch.tensor([0.0, 1.0, 2.0, -1.0]))
    vae.codebook.weight.copy_(
        torch.eye(4, 3)
    )  # code 3 -> the zero vector, told apart by the decoder input
    seen = []
    vae.decoder = torch.nn.Identity()
    for _ in range(50):
        z = vae(torch.zeros(400, 3, 2, 2), hard=True)[0].flatten(1)
        seen.append(
            torch.where(z.abs().sum(1) > 0, z.argmax(1), torch.full_like(z[:, 0], 3).long())
        )
    freq = torch.bincount(torch.cat(seen), minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.0, 1.0, 2.0, -1.0]).softmax(0), atol=0.01)


def test_train_vae_bad_input(tmp_path):
    (tmp_path / 'empty').mkdir()

    def fails(match, folder, *extra):
        with pytest.raises(utils.UserError, match=match):
            run_script(
                train_vae, ['--image_folder', folder, '--out', tmp_path / 'o', *VAE_ARGS, *extra]
            )

    fails('no images', tmp_path / 'empty')
    fails('divisible', tmp_path, '--image_size', 18)
    fails(
        'STRAIGHT_THROUGH=True: a Gumbel-softmax setting',
        tmp_path,
        *('--set', 'MODEL.QUANTIZER=vq', '--set', 'TRAIN.STRAIGHT_THROUGH=true'),
    )
    fails(
        "MODEL.QUANTIZER='vqq': expected one of gumbel, vq",
        tmp_path,
        *('--set', 'MODEL.QUANTIZER=vqq'),
    )
    fails(
        'REINMAX=true needs TRAIN.STRAIGHT_THROUGH',
        tmp_path,
        *('--set', 'TRAIN.REINMAX=true', '--set', 'TRAIN.STRAIGHT_THROUGH=false'),
    )


@pytest.fixture(scope='module')
def tiny_vae(tmp_path_factory, nested_images):
    out = tmp_path_factory.mktemp('vae')
    run_script(train_vae, ['--image_folder', nested_images, '--epochs', 1, '--out', out, *VAE_ARGS])
    return str(out / 'vae.pt')


DALLE_ARGS = [
    '--dim',
    16,
    '--depth',
    1,
    '--heads',
    2,
    '--dim_head',
    8,
    '--text_seq_len',
    32,
    '--batch_size',
    8,
    '--set',
    'WORKERS=0',
    '--set',
    'TRAIN.LOG_EVERY=2',
    '--set',
    'TRAIN.NUM_SAMPLES=2',
    '--set',
    'TRAIN.SAMPLE_EVERY=0',
]


@pytest.mark.slow
def test_train_dalle_resume_then_generate_and_rerank(
    tiny_shapes, tiny_vae, tmp_path, tiny_encoder, tiny_judge, monkeypatch
):
    data = os.path.join(tiny_shapes, 'train.jsonl')  # 400 captions of 40 images
    a = tmp_path / 'a'
    args = [
        '--image_text_folder',
        data,
        '--vae_path',
        tiny_vae,
        '--set',
        'TEXT.TOKENIZER=words',
        '--epochs',
        1,
        *DALLE_ARGS,
        '--set',
        'TRAIN.KEEP_N_CHECKPOINTS=0',
        '--set',
        'TRAIN.SAVE_EVERY_N_STEPS=20',
    ]
    m = run_script(
        train_dalle,
        [
            *args,
            '--out',
            a,
            '--dalle_output_file_name',
            'vae_dalle',
            '--set',
            f'EVAL.HOLDOUT={tiny_shapes}/test.jsonl',
            '--set',
            'EVAL.NUM_CAPTIONS=6',
            '--set',
            f'EVAL.JUDGE={tiny_judge}',
            '--set',
            'EVAL.BASELINE=true',
            '--set',
            f'EVAL.ENCODER={tiny_encoder}',
            '--set',
            'EVAL.CURVE=true',
            '--set',
            'EVAL.RERANK=3',
        ],
    )
    # the learning curve: every step checkpoint scored, the last one the final evaluation
    curve = json.load(open(a / 'curve.json'))
    assert [r['step'] for r in curve] == [20, 40, 50] and (a / 'curve.png').is_file()
    assert curve[-1]['judge_all'] == m['judge_all'] and curve[-1]['r_precision'] == m['r_precision']
    seconds = [r['train_seconds'] for r in curve]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert all(0 <= r['judge_all'] <= 1 and 'untrained_judge_all' not in r for r in curve)
    assert (
        m['train_steps'] == 50 and m['final_loss'] > 0 and m['dalle_path'].endswith('vae_dalle.pt')
    )
    assert m['eval_captions'] == 6 and os.path.isfile(
        a / 'holdout_samples.png'
    )  # one sample per held-out caption
    for attr in ('count', 'shape', 'colour', 'size', 'position', 'all'):
        assert all(0 <= m[f'{p}judge_{attr}'] <= 1 for p in ('', 'untrained_', 'shuffled_'))
    # R-precision of the samples with the encoder: every caption of another class as a negative
    held = utils.read_pairs(f'{tiny_shapes}/test.jsonl')
    held = held[:: max(1, len(held) // 6)][:6]
    classes = [os.path.basename(os.path.dirname(p)) for p, _ in held]
    assert m['r_precision_negatives'] == 6 - max(classes.count(c) for c in classes)
    assert 0 <= m['r_precision'] <= 1 and 0 <= m['untrained_r_precision'] <= 1
    # the protocol names the weights with their sha256; the samples' verdicts and dump as DM-GAN's
    with open(m['dalle_path'], 'rb') as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert m['protocol']['weights']['dalle'] == {'path': m['dalle_path'], 'sha256': sha}
    assert m['protocol']['num_images'] == 6 and 'dalle' not in m['untrained_protocol']['weights']
    lines = [json.loads(x) for x in open(a / 'judge.jsonl')]
    assert len(lines) == 6 and m['judge_all'] == pytest.approx(sum(x['correct'] for x in lines) / 6)
    dumped = json.load(open(a / 'holdout_images' / 'keys.json'))
    assert sorted(dumped) == sorted(x['file'] for x in lines)
    assert all((a / 'holdout_images' / f).is_file() for f in dumped)
    # the encoder's top-1 of 3 samples per caption, scored and dumped the same way
    lines = [json.loads(x) for x in open(a / 'judge_rerank.jsonl')]
    assert m['rerank_samples'] == 3 and m['rerank_protocol']['num_images'] == 6
    assert m['rerank_judge_all'] == pytest.approx(sum(x['correct'] for x in lines) / 6)
    assert 0 <= m['rerank_r_precision'] <= 1
    dumped = json.load(open(a / 'holdout_images_rerank' / 'keys.json'))
    assert sorted(dumped) == sorted(x['file'] for x in lines)
    ck = utils.load_checkpoint(m['dalle_path'], 'dalle')
    assert {'hparams', 'vae_class_name', 'vae_params', 'tokenizer'} <= set(ck['extra'])
    assert (
        set(ck['models']) == {'dalle', 'vae'}
        and ck['optimizers']['opt']['state']
        and ck['epoch'] == 1
    )
    # --dalle_path resumes mid-epoch (step 20 of 50): the same final weights
    b = tmp_path / 'b'
    run_script(
        train_dalle, [*args, '--out', b, '--dalle_path', a / 'checkpoints' / 'dalle_00000020.pt']
    )
    wa = utils.load_checkpoint(str(a / 'checkpoints' / 'dalle_00000050.pt'))['models']['dalle']
    wb = utils.load_checkpoint(str(b / 'checkpoints' / 'dalle_00000050.pt'))['models']['dalle']
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # dalle_gen: IMG_NUM images + grid, KV cache
    g = tmp_path / 'gen'
    run_script(
        dalle_gen,
        [
            'a large red circle in the center.',
            5,
            g,
            '--dalle_path',
            m['dalle_path'],
            '--batch_size',
            2,
            '--top_k',
            0.5,
        ],
    )
    files = sorted(os.listdir(g))
    assert {f'{i}.png' for i in range(5)} | {'grid.png', 'caption.txt'} <= set(files)
    with open(g / 'metrics.json') as f:
        assert json.load(f)['tokens_per_second'] > 0
    # clip_sort with our encoders (--clip_path)
    run_script(
        clip_sort,
        ['a large red circle in the center.', 5, g, '--clip_path', tiny_encoder, '--top_k', 3],
    )
    with open(g / 'ranking.json') as f:
        r = json.load(f)
    assert sorted(x['index'] for x in r['ranking']) == list(range(5))
    scores = [x['score'] for x in r['ranking']]
    assert scores == sorted(scores, reverse=True) and os.path.isfile(g / 'top3.png')
    # several captions at once ('|'): caption k in SAVE_PATH/<k>, each sampled as when alone
    many = tmp_path / 'many'
    texts = 'a small blue square. | a large red circle in the center.'
    run_script(
        dalle_gen,
        [texts, 5, many, '--dalle_path', m['dalle_path'], '--batch_size', 2, '--top_k', 0.5],
    )
    assert (many / '1' / 'caption.txt').read_text() == 'a large red circle in the center.\n'
    for i in range(5):
        assert torch.equal(
            TF.to_tensor(utils.load_image(many / '1' / f'{i}.png')),
            TF.to_tensor(utils.load_image(g / f'{i}.png')),
        )
    run_script(clip_sort, [texts, 5, many, '--clip_path', tiny_encoder, '--top_k', 3])
    with open(many / '1' / 'ranking.json') as f:
        assert json.load(f)['ranking'] == r['ranking']
    assert os.path.isfile(many / '0' / 'ranking.json')
    with pytest.raises(utils.UserError, match="empty caption"):
        run_script(
            dalle_gen, ['a red circle. |', 2, tmp_path / 'bad', '--dalle_path', m['dalle_path']]
        )
    # text2img's command lines, TEXT IMG_NUM SAVE_PATH and nothing else: the models where
    # train_dalle.py and pretrain_DAMSM.py leave them without --cfg/--out, else one line saying
    # what to train first
    seed = tmp_path / 'seed'
    seed.mkdir()
    monkeypatch.chdir(seed)
    with pytest.raises(
        utils.UserError, match=r'output/dalle/checkpoints/dalle.pt: no DALLE.*train_dalle.py'
    ):
        run_script(dalle_gen, ['a red circle.', 2, 'samples'])
    with pytest.raises(utils.UserError, match=r'output/DAMSM: no CLIP encoder.*pretrain_DAMSM.py'):
        run_script(clip_sort, ['a red circle.', 2, 'samples'])
    with pytest.raises(utils.UserError, match=r'output/vae/vae.pt: no VAE.*train_vae.py'):
        run_script(train_dalle, ['--image_text_folder', data, *DALLE_ARGS])
    (seed / 'output' / 'dalle' / 'checkpoints').mkdir(parents=True)
    shutil.copy(m['dalle_path'], seed / 'output' / 'dalle' / 'checkpoints' / 'dalle.pt')
    shutil.copytree(os.path.dirname(tiny_encoder), seed / 'output' / 'DAMSM' / 'checkpoints')
    run_script(dalle_gen, ['a red circle.', 2, 'samples'])
    run_script(clip_sort, ['a red circle.', 2, 'samples'])
    assert {'0.png', '1.png', 'grid.png', 'ranking.json'} <= set(os.listdir(seed / 'samples'))


def test_reranked_sampler_keeps_the_sample_its_encoder_scores_highest():
    """EVAL.RERANK: n samples per caption, the one whose image feature is nearest the caption's
    sentence feature kept, caption by caption."""
    n = 3

    class Model:
        def eval(self):
            return self

        def generate_image_tokens(self, ids, *args, **kwargs):
            return torch.tensor([[5], [9], [1], [2], [0], [7]])[: len(ids)]

    class VAE:
        def decode(self, tokens):  # image k is filled with k / 10
            return (tokens.float() / 10)[:, :, None, None].expand(-1, 3, 2, 2)

    class ImageEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode(self, images):  # caption "a" prefers bright images, "b" dark ones
            v = images.mean((1, 2, 3))
            return None, torch.stack([v, 1 - v], 1)

    class TextEncoder:
        def encode(self, texts):
            return None, torch.tensor([[1.0, 0.0] if t == 'a' else [0.0, 1.0] for t in texts]), None

    class Tokenizer:
        def tokenize(self, text, length, truncate):
            return torch.zeros(length, dtype=torch.long)

    cfg = utils.to_cfg(
        {
            'SEED': 0,
            'TEXT': {'TEXT_SEQ_LEN': 4},
            'SAMPLE': {'TOP_K': 0.9, 'TEMPERATURE': 1.0, 'TOP_K_OVER': 'image'},
        }
    )
    shown = []
    sample = train_dalle.dalle_sampler(
        Model(), VAE(), Tokenizer(), cfg, 'cpu', shown, (n, (TextEncoder(), ImageEncoder()))
    )
    images = sample([{'caption': 'a'}, {'caption': 'b'}])
    # caption a: tokens 5, 9, 1 -> the brightest, 9; caption b: 2, 0, 7 -> the darkest, 0
    assert images.shape == (2, 3, 2, 2)
    assert images[:, 0, 0, 0].tolist() == pytest.approx([0.9, 0.0])
    assert len(shown[0]) == 2


@pytest.mark.slow
def test_cached_image_tokens_train_as_tokenising_every_step(tiny_shapes, tiny_vae, tmp_path):
    """TRAIN.CACHE_IMAGE_TOKENS: each image tokenised once gives the tokens (and so the weights)
    that tokenising every batch gives, under the fixed transform it requires."""
    data = os.path.join(tiny_shapes, 'train.jsonl')
    args = [
        '--image_text_folder',
        data,
        '--vae_path',
        tiny_vae,
        '--set',
        'TEXT.TOKENIZER=words',
        '--epochs',
        1,
        *DALLE_ARGS,
        '--set',
        'TRAIN.MAX_STEPS=6',
        '--random_resize_crop_lower_ratio',
        1.0,
    ]
    run_script(train_dalle, [*args, '--out', tmp_path / 'plain'])
    run_script(
        train_dalle, [*args, '--out', tmp_path / 'cached', '--set', 'TRAIN.CACHE_IMAGE_TOKENS=true']
    )
    wa, wb = (
        utils.load_checkpoint(str(tmp_path / r / 'checkpoints' / 'dalle.pt'))['models']['dalle']
        for r in ('plain', 'cached')
    )
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    vae = models.load_discrete_vae(tiny_vae).eval()
    cfg = utils.build_cfg(
        train_dalle.DEFAULTS,
        utils.base_parser('x').parse_args(
            ['--set', 'TRAIN.RANDOM_RESIZE_CROP_LOWER_RATIO=1.0', '--set', 'TEXT.TOKENIZER=words']
        ),
    )
    pairs = utils.read_pairs(data)[:30]
    tok = train_dalle.build_tokenizer(cfg, pairs)
    ds = train_dalle.build_dataset(cfg, tok, pairs, vae.image_size)
    cached = train_dalle.CachedTokenPairs(
        ds, vae, torch.device('cpu'), torch.autocast('cpu', enabled=False)
    )
    for i in (0, 7, 29):
        image, text = ds[i]
        tokens, text_cached = cached[i]
        assert torch.equal(tokens, vae.get_codebook_indices(image[None])[0]) and torch.equal(
            text, text_cached
        )
    with pytest.raises(
        utils.UserError, match='CACHE_IMAGE_TOKENS needs TRAIN.RANDOM_RESIZE_CROP_LOWER_RATIO=1'
    ):
        run_script(
            train_dalle,
            [*args[:-2], '--out', tmp_path / 'crop', '--set', 'TRAIN.CACHE_IMAGE_TOKENS=true'],
        )


def test_preloaded_vae_images_equal_decoding_each_step(nested_images):
    paths = utils.list_images(nested_images)[:5]
    plain = utils.PairDataset([(p, '') for p in paths], train_vae.image_transform(16))
    pre = utils.PairDataset([(p, '') for p in paths], train_vae.image_transform(16), preload=True)
    assert all(torch.equal(plain[i][0], pre[i][0]) for i in range(len(paths)))


@pytest.mark.slow
def test_train_dalle_caption_too_long(tiny_shapes, tiny_vae, tmp_path):
    data = os.path.join(tiny_shapes, 'train.jsonl')
    base = [
        '--image_text_folder',
        data,
        '--vae_path',
        tiny_vae,
        '--set',
        'TEXT.TOKENIZER=words',
        '--epochs',
        1,
        *DALLE_ARGS,
        '--text_seq_len',
        4,
    ]
    with pytest.raises(utils.UserError, match=r"caption '.*' has \d+ tokens > TEXT_SEQ_LEN=4"):
        run_script(train_dalle, [*base, '--out', tmp_path / 'a'])
    # reranking without the encoder that ranks is refused before any training
    with pytest.raises(utils.UserError, match='EVAL.RERANK=8 needs EVAL.ENCODER'):
        run_script(
            train_dalle,
            [*base, '--out', tmp_path / 'r', '--set', 'EVAL.JUDGE=x', '--set', 'EVAL.RERANK=8'],
        )
    assert not (tmp_path / 'r' / 'checkpoints').exists()
    m = run_script(
        train_dalle, [*base, '--out', tmp_path / 'b', '--truncate_captions', '--batch_size', 100]
    )
    assert m['train_steps'] == 4


def chinese_folder(root, tiny_shapes):
    """DALLE-pytorch's folder format with Chinese captions, and a tiny BERT vocab.txt."""
    caps = ['红色的圆', '蓝色的方块', '绿色的三角形在左边', '黄色的星星']
    for i, p in enumerate(
        utils.list_images(os.path.join(tiny_shapes, 'CUB_200_2011', 'images'))[:16]
    ):
        shutil.copy(p, root / f'{i}.jpg')
        (root / f'{i}.txt').write_text(
            caps[i % 4] + '\n' + caps[(i + 1) % 4] + '\n', encoding='utf-8'
        )
    chars = sorted({ch for c in caps for ch in c})
    vocab = root / 'vocab.txt'
    vocab.write_text(
        '\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + chars) + '\n', encoding='utf-8'
    )
    return str(vocab)


@pytest.mark.slow
def test_train_dalle_chinese_tokenizer(tiny_shapes, tiny_vae, tmp_path):
    (tmp_path / 'data').mkdir()
    vocab = chinese_folder(tmp_path / 'data', tiny_shapes)
    m = run_script(
        train_dalle,
        [
            '--image_text_folder',
            tmp_path / 'data',
            '--vae_path',
            tiny_vae,
            '--chinese',
            '--bpe_path',
            vocab,
            '--epochs',
            1,
            *DALLE_ARGS,
            '--out',
            tmp_path / 'o',
        ],
    )
    ck = utils.load_checkpoint(m['dalle_path'], 'dalle')
    assert ck['extra']['tokenizer'] == {'kind': 'chinese', 'path': vocab}
    tok = utils.DalleTokenizer(ck['extra']['tokenizer'])
    ids = tok.tokenize('红色的圆', 6, False).tolist()
    assert ids[4:] == [0, 0] and 0 not in ids[:4] and 1 not in ids[:4]  # no [UNK], no [CLS]/[SEP]
    assert ck['extra']['hparams']['num_text_tokens'] == tok.vocab_size


@pytest.mark.slow
def test_train_dalle_clip_bpe_and_vqgan(tiny_shapes, tmp_path):
    bpe = str(tmp_path / 'bpe')
    write_clip_bpe(bpe)
    tok = utils.DalleTokenizer({'kind': 'clip', 'path': bpe})
    ids = tok.encode('a red circle.')
    assert 0 not in ids and min(ids) >= 1 and len(ids) < len('a red circle.')  # shifted, merged
    ckpt, cfg = write_tiny_vqgan(tmp_path)
    data = os.path.join(tiny_shapes, 'test.jsonl')
    m = run_script(
        train_dalle,
        [
            '--image_text_folder',
            data,
            '--taming',
            '--vqgan_model_path',
            ckpt,
            '--vqgan_config_path',
            cfg,
            '--bpe_path',
            bpe,
            '--epochs',
            1,
            *DALLE_ARGS,
            '--batch_size',
            100,
            '--text_seq_len',
            160,
            '--out',
            tmp_path / 'o',
        ],
    )
    ck = utils.load_checkpoint(m['dalle_path'], 'dalle')
    assert (
        ck['extra']['vae_class_name'] == 'VQGAN' and ck['extra']['hparams']['image_fmap_size'] == 8
    )
    dalle, vae, _ = models.load_dalle(ck, torch.device('cpu'))
    assert isinstance(vae, models.VQGAN) and dalle.image_seq_len == 64
    with pytest.raises(utils.UserError, match='go together'):
        run_script(
            train_dalle,
            ['--image_text_folder', data, '--vqgan_model_path', ckpt, '--out', tmp_path / 'x'],
        )
    assert ck['cfg']['TAMING'] is True
    # --taming without the files: DALLE-pytorch would download the ImageNet VQGAN; one line here
    with pytest.raises(utils.UserError, match='--taming: give the VQGAN as --vqgan_model_path'):
        run_script(train_dalle, ['--image_text_folder', data, '--taming', '--out', tmp_path / 'y'])
    with pytest.raises(utils.UserError, match='--taming: give the VQGAN as'):
        run_script(
            train_dalle,
            [
                '--image_text_folder',
                data,
                '--taming',
                '--vqgan_config_path',
                cfg,
                '--out',
                tmp_path / 'z',
            ],
        )


@pytest.mark.slow
def test_train_dalle_resumes_a_dalle_pytorch_checkpoint_and_dalle_gen_samples_it(
    tiny_shapes, tmp_path
):
    """--dalle_path dalle.pt of DALLE-pytorch: the epoch it saved is redone from its start, Adam
    goes on from its two steps; dalle_gen.py samples the same file; a bad one is one line."""
    dalle_pytorch_checkpoint(tmp_path / 'dalle.pt')
    bpe = str(tmp_path / 'bpe')
    write_clip_bpe(bpe, DALLE_PYTORCH_TEST_MERGES)
    data = os.path.join(tiny_shapes, 'test.jsonl')  # 200 captions of 20 images
    common = ['--bpe_path', bpe, '--text_seq_len', 8, '--truncate_captions', '--batch_size', 8]
    common += [
        '--set',
        'WORKERS=0',
        '--set',
        'TRAIN.SAMPLE_EVERY=0',
        '--set',
        'TRAIN.NUM_SAMPLES=2',
    ]
    m = run_script(
        train_dalle,
        ['--image_text_folder', data, '--dalle_path', tmp_path / 'dalle.pt', '--epochs', 5]
        + common
        + ['--out', tmp_path / 'run'],
    )
    steps = len(utils.read_pairs(data)) // 8
    assert m['train_steps'] == 5 * steps  # epochs 3 and 4 run, counted from epoch 3's start
    ck = utils.load_checkpoint(m['dalle_path'], 'dalle')
    assert ck['epoch'] == 5 and ck['extra']['tokenizer'] == {
        'kind': 'clip',
        'path': bpe,
        'shift': 0,
    }
    adam_steps = {float(s['step']) for s in ck['optimizers']['opt']['state'].values()}
    assert adam_steps == {2.0 + 2 * steps}  # DALLE-pytorch's 2 steps, then ours
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'resuming DALLE-pytorch 1.6.6 checkpoint' in log and 'epoch 3 redone' in log
    run_script(
        dalle_gen,
        [
            'a red circle.',
            3,
            tmp_path / 'gen',
            '--dalle_path',
            tmp_path / 'dalle.pt',
            '--bpe_path',
            bpe,
        ],
    )
    assert {'0.png', '1.png', '2.png', 'grid.png'} <= set(os.listdir(tmp_path / 'gen'))
    # one line naming the file and the key, non-zero exit
    bad = dalle_pytorch_checkpoint()
    bad['weights']['transformer.layers.layers.0.0.fn.fn.to_qkv.weight'] = torch.zeros(48, 16)
    torch.save(bad, tmp_path / 'bad.pt')
    for argv in (
        ['dalle_gen.py', 'a red circle.', 2, tmp_path / 'g2', '--dalle_path', tmp_path / 'bad.pt'],
        [
            'train_dalle.py',
            '--image_text_folder',
            data,
            '--dalle_path',
            tmp_path / 'bad.pt',
            '--out',
            tmp_path / 'r2',
        ],
    ):
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, argv[0]), *map(str, argv[1:]), '--bpe_path', bpe],
            capture_output=True,
            text=True,
            timeout=300,
        )
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr
        assert last.startswith('error: ') and 'bad.pt' in last, last
        assert "'transformer.layers.layers.0.0.fn.fn.to_qkv.weight' maps to no" in last, last


# ----------------------------------------------------------------------------------------------
# clip_sort with transformers CLIP and Chinese-CLIP (tiny random-init models saved to disk)
# ----------------------------------------------------------------------------------------------
def _gen_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for i in range(n):
        utils.save_image_grid(torch.rand(1, 3, 24, 24) * 2 - 1, str(folder / f'{i}.png'), nrow=1)


def _tiny_vision():
    return dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )


@pytest.mark.slow
def test_clip_sort_transformers_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    bpe = str(tmp_path / 'clip')
    write_clip_bpe(bpe)
    tok = CLIPTokenizer.from_pretrained(bpe)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=len(tok) - 2,
            eos_token_id=len(tok) - 1,
            pad_token_id=len(tok) - 1,
        ),
        vision_config=_tiny_vision(),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(tmp_path / 'clip'))
    ip = CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(tmp_path / 'clip'))
    _gen_images(tmp_path / 'g', 4)
    run_script(
        clip_sort,
        ['a red circle.', 4, tmp_path / 'g', '--clip_model', tmp_path / 'clip', '--top_k', 2],
    )
    with open(tmp_path / 'g' / 'ranking.json') as f:
        r = json.load(f)['ranking']
    scores = [x['score'] for x in r]
    assert len(r) == 4 and scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    assert os.path.isfile(tmp_path / 'g' / 'top2.png')


@pytest.mark.slow
def test_clip_sort_transformers_chinese_clip(tmp_path):
    from transformers import (
        BertTokenizer,
        ChineseCLIPConfig,
        ChineseCLIPImageProcessor,
        ChineseCLIPModel,
        ChineseCLIPProcessor,
    )

    (tmp_path / 'data').mkdir()
    d = tmp_path / 'cn'
    d.mkdir()
    chars = sorted(set('红色的圆蓝方块'))
    (d / 'vocab.txt').write_text(
        '\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + chars) + '\n', encoding='utf-8'
    )
    tok = BertTokenizer(str(d / 'vocab.txt'))
    cfg = ChineseCLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        ),
        vision_config=_tiny_vision(),
        projection_dim=8,
    )
    torch.manual_seed(0)
    ChineseCLIPModel(cfg).save_pretrained(str(d))
    ip = ChineseCLIPImageProcessor(
        size={'height': 32, 'width': 32}, crop_size={'height': 32, 'width': 32}
    )
    ChineseCLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(d))
    _gen_images(tmp_path / 'g', 3)
    run_script(clip_sort, ['红色的圆', 3, tmp_path / 'g', '--clip_model', d])
    with open(tmp_path / 'g' / 'ranking.json', encoding='utf-8') as f:
        r = json.load(f)
    assert r['text'] == '红色的圆' and len(r['ranking']) == 3
    with pytest.raises(utils.UserError, match='no 3.png'):
        run_script(clip_sort, ['红色的圆', 4, tmp_path / 'g', '--clip_model', d])
    with pytest.raises(utils.UserError, match='not both'):
        run_script(clip_sort, ['红色的圆', 3, tmp_path / 'g', '--clip_model', d, '--clip_path', d])


# ----------------------------------------------------------------------------------------------
# The Wukong-style filter on a hand-made CSV
# ----------------------------------------------------------------------------------------------
def test_wukong_filter_rules(tmp_path):
    from PIL import Image

    img = tmp_path / 'img'
    img.mkdir()
    sizes = {
        'ok': (64, 48),
        'wide': (200, 40),
        'tall': (40, 130),
        'small': (60, 24),
        'thin': (20, 50),
    }
    for name, s in sizes.items():
        Image.new('RGB', s, (200, 100, 50)).save(img / f'{name}.jpg')
    (img / 'broken.jpg').write_bytes(b'not an image')
    rows = [
        ('ok', '美味的红烧肉'),
        ('ok', '一道家常菜，红烧肉'),
        ('ok', '好吃的米饭'),
        ('ok', '番茄炒蛋的做法'),
        ('ok', '清蒸鱼'),
        ('ok', '糖醋排骨真好吃'),
        ('ok', '今天的红烧肉'),
        ('ok', '红烧肉和米饭'),
        ('ok', '米饭'),
        ('ok', '排骨汤'),  # 10 kept
        ('ok', '红烧肉' * 11),  # 33 chars
        ('ok', '3个红烧肉'),
        ('ok', '红烧肉？'),
        ('ok', '《红烧肉》'),
        ('ok', '红烧肉:好吃'),
        ('ok', '红烧肉' + 'a' * 19),
        ('ok', '今天天气很好'),  # no keyword
        ('wide', '红烧肉'),
        ('tall', '红烧肉'),
        ('small', '红烧肉'),
        ('thin', '红烧肉'),
        ('broken', '红烧肉'),
    ]
    with open(tmp_path / 'data.csv', 'w', encoding='utf-8') as f:
        f.write('filepath,caption\n' + ''.join(f'img/{n}.jpg,{c}\n' for n, c in rows))
    (tmp_path / 'food.txt').write_text('红烧肉\n米饭\n番茄炒蛋\n清蒸鱼\n排骨\n', encoding='utf-8')
    filter_cfg = utils.to_cfg(
        {
            **preprocess_data.DEFAULTS['FILTER'],
            'INPUT_CSV': str(tmp_path / 'data.csv'),
            'KEYWORDS': str(tmp_path / 'food.txt'),
            'OUT_DIR': str(tmp_path / 'out'),
        }
    )
    m = preprocess_data.filter_pairs(filter_cfg, utils.get_logger(None, 'filter'))
    assert m == {
        'input_pairs': 22,
        'kept': 10,
        'train': 9,
        'val': 1,
        'dropped_caption_too_long': 1,
        'dropped_forbidden_characters': 4,
        'dropped_piece_too_long': 1,
        'dropped_no_keyword': 1,
        'dropped_aspect_ratio': 2,
        'dropped_too_small': 2,
        'dropped_unreadable_image': 1,
    }
    train = utils.read_csv_pairs(str(tmp_path / 'out' / 'train_clean.csv'))
    val = utils.read_jsonl_pairs(str(tmp_path / 'out' / 'DALLE.val.jsonl'))
    assert len(train) == 9 and len(val) == 1 and all(os.path.isfile(p) for p, _ in train + val)
    assert {t for _, t in train + val} == {c for n, c in rows[:10]}
    m2 = preprocess_data.filter_pairs(
        filter_cfg, utils.get_logger(None, 'filter')
    )  # the split is seeded
    assert m2 == m and utils.read_jsonl_pairs(str(tmp_path / 'out' / 'DALLE.val.jsonl')) == val


def test_dalle_gen_takes_generate_py_vqgan_flags_and_reads_only_the_config():
    """generate.py's --vqgan_model_path is accepted (its commands run as written) but maps to no
    cfg key: the DALLE checkpoint carries the VQGAN's weights; --vqgan_config_path is read."""
    args = dalle_gen.parse_args(
        [
            'TEXT',
            '2',
            'out',
            '--taming',
            '--vqgan_model_path',
            'last.ckpt',
            '--vqgan_config_path',
            'm.yaml',
        ]
    )
    assert args.vqgan_model_path == 'last.ckpt'
    assert not any(s.startswith('VQGAN_MODEL_PATH') for s in args.set)
    assert 'VQGAN_CONFIG_PATH="m.yaml"' in args.set and 'TAMING=true' in args.set
