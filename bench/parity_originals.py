"""Parity with the original code: the modules that the original repositories' weights load into
compute what the original modules compute. MinfengZhu/DM-GAN and taoxugit/AttnGAN code/model.py
are imported as they are, their cfg (code/miscc/config.py) set to the shipped cfgs (DM-GAN
code/cfg/bird_DMGAN.yml, AttnGAN code/cfg/DAMSM/bird.yml) on CPU; G_NET, D_NET64/128/256,
RNN_ENCODER and CNN_ENCODER get seeded random weights; each state_dict() goes through the
project's own loaders (models.load_dmgan_generator from a bird_DMGAN.pth, convert_dmgan_state_dict
as main.py's netD<i>.pth, models.load_encoders from text_encoder200.pth + image_encoder200.pth)
and both sides run on the same inputs (same z, sentence and word features, masks, CA noise).

    python bench/parity_originals.py --dmgan_code DM-GAN/code --attngan_code AttnGAN/code
    python bench/parity_originals.py --dmgan_code DM-GAN/code --attngan_code AttnGAN/code \\
        --tiny --save tests/data/dmgan_original_outputs.pt

(DM-GAN/ and AttnGAN/ are clones of the two repositories.) Prints max |ours - original| per
output and its ratio to max |original|, and exits 1 when an equality row's ratio is above --tol.
Rows marked 'deviation' measure the known differences, on inputs chosen to show them; they do not
count. Ours runs with main.py's defaults for DM-GAN's modules (GAN.SN_EVAL_POWER_ITERATION,
TRAIN.NET_E_ALIGN_CORNERS); the deviation rows turn those options off. --tiny runs widths the original code accepts at a fraction of the size (GF_DIM 4, DF_DIM 2,
EMBEDDING_DIM 8, ...), the setting of the test fixture; --save writes the original's weights,
the inputs and the original's outputs there, for tests/test_real_files.py to check our modules
against without the original code. The shims the 2018 code needs on this PyTorch are made here,
at run time; the original files are not edited.
"""

import argparse
import importlib
import math
import os
import subprocess
import sys
import tempfile
import types
from types import SimpleNamespace as NS

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import main as dmgan_main  # noqa: E402  (main.py: the DM-GAN cfgs' defaults)
import models  # noqa: E402
import utils  # noqa: E402

TOL = 1e-5
BATCH = 2
# Both repositories name their modules alike; each is imported on its own
ORIGINAL_TOP_MODULES = ('model', 'miscc', 'GlobalAttention', 'spectral')
TINY = {
    'GAN': {'GF_DIM': 4, 'DF_DIM': 2, 'Z_DIM': 8, 'CONDITION_DIM': 4},
    'TEXT': {'EMBEDDING_DIM': 8, 'WORDS_NUM': 6},
}
FULL_WORDS, TINY_WORDS = 5450, 12  # vocabulary of AttnGAN's bird captions.pickle / the fixture's


# ---- the original code, as it is --------------------------------------------------------------
def install_shims():
    try:
        import easydict  # noqa: F401
    except ImportError:
        sys.modules['easydict'] = types.ModuleType('easydict')
        sys.modules['easydict'].EasyDict = utils.Cfg  # easydict's attribute access to dict items


def import_original(code_dir):
    """code_dir/model.py with its own miscc.config cfg, GlobalAttention (and spectral)."""
    install_shims()

    def ours(n):
        return n.split('.')[0] in ORIGINAL_TOP_MODULES

    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if ours(n)}
    sys.path.insert(0, os.path.abspath(code_dir))
    try:
        return importlib.import_module('model')
    finally:
        sys.path.remove(os.path.abspath(code_dir))
        for n in [n for n in sys.modules if ours(n)]:
            del sys.modules[n]
        sys.modules.update(saved)


def set_cfg(cfg, values, where=''):
    """Merge a cfg file's values into the original's cfg (keys must exist there, as its
    cfg_from_file requires; that function is Python 2 and is not called)."""
    for k, v in values.items():
        if k not in cfg:
            raise KeyError(f'{where}{k}: not a key of the original cfg')
        if isinstance(v, dict):
            set_cfg(cfg[k], v, f'{where}{k}.')
        else:
            setattr(cfg, k, v)


def configure(mod, cfg_file, tiny):
    import yaml

    with open(cfg_file) as f:
        set_cfg(mod.cfg, yaml.safe_load(f))
    set_cfg(mod.cfg, {'CUDA': False, 'TRAIN': {'FLAG': True}})  # CPU; CNN_ENCODER(nef) as trained
    if tiny:
        set_cfg(mod.cfg, TINY)
    return mod.cfg


def random_inception(mod):
    """CNN_ENCODER downloads ImageNet weights into torchvision's inception_v3(); here the network
    is torchvision's without a download (its weights are replaced by seeded ones afterwards)."""
    import torchvision

    made = []

    def inception_v3():
        made.append(torchvision.models.inception_v3(weights=None, init_weights=False))
        return made[-1]

    mod.models = NS(inception_v3=inception_v3)
    mod.model_zoo = NS(load_url=lambda url, *a, **k: made[-1].state_dict())


def git_head(code_dir):
    try:
        return subprocess.run(
            ['git', '-C', code_dir, 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


# ---- weights and inputs -----------------------------------------------------------------------
def layout(module):
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items()]


def seeded_state(lay, seed):
    """Weights for a state-dict layout [(key, shape, dtype)], drawn in order from one seeded
    generator (the same tensors wherever torch's CPU generator is): weights ~ N(0, 1/fan_in),
    biases and running means N(0, 0.01), BN scales 1 + N(0, 0.01), running variances U(0.5, 1.5)
    (so BatchNorm in eval mode is not the identity), spectral-norm u/v unit vectors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape, dtype in lay:
        leaf = key.rsplit('.', 1)[-1]
        if dtype != 'torch.float32':
            out[key] = torch.zeros(shape, dtype=getattr(torch, dtype.split('.')[1]))
            continue
        r = torch.randn(shape, generator=g)
        if leaf == 'running_var':
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif leaf == 'running_mean' or leaf.startswith('bias'):
            out[key] = 0.1 * r
        elif leaf in ('weight_u', 'weight_v'):
            out[key] = F.normalize(r, dim=0)
        elif len(shape) == 1:
            out[key] = 1 + 0.1 * r
        else:
            out[key] = r / math.sqrt(math.prod(shape[1:]))
    return out


def converged_sn(state, iters=100):
    """The state with every spectral-norm u/v pair at the top singular vectors of its weight
    (float64 power iteration), as in weights saved after training; original names."""
    out = dict(state)
    for k in state:
        if k.endswith('.weight_bar'):
            p, w = k[: -len('bar')], state[k].double().reshape(state[k].shape[0], -1)
            u = state[p + 'u'].double()
            for _ in range(iters):
                v = F.normalize(w.t() @ u, dim=0)
                u = F.normalize(w @ v, dim=0)
            out[p + 'u'], out[p + 'v'] = u.float(), v.float()
    return out


def cast(x, dtype):
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in x.items()}


def fingerprint(state):
    return [
        float(sum(v.double().sum() for v in state.values())),
        float(sum(v.double().abs().sum() for v in state.values())),
    ]


def make_inputs(cfg, n_words, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, T, E = BATCH, cfg.TEXT.WORDS_NUM, cfg.TEXT.EMBEDDING_DIM
    lengths = torch.tensor([T, T - 1, T - 3])  # the original packs sorted captions
    caps = torch.randint(1, n_words, (3, T), generator=g)
    caps[torch.arange(T)[None] >= lengths[:, None]] = 0  # '<end>' pads
    x = {
        'z': torch.randn(B, cfg.GAN.Z_DIM, generator=g),
        'sent': torch.randn(B, E, generator=g),
        'words': torch.randn(B, E, T, generator=g),
        'd_base': torch.rand(B, 3, 32, 32, generator=g) * 2 - 1,
        'captions': caps,
        'cap_lens': lengths,
        'images': torch.rand(B, 3, 64, 64, generator=g) * 2 - 1,
        'eps_seed': torch.tensor(seed + 1),
    }
    torch.manual_seed(int(x['eps_seed']))  # CA_NET.reparametrize's draw, made the same way
    x['eps'] = torch.FloatTensor(B, cfg.GAN.CONDITION_DIM).normal_()
    return x


def pad_mask(kind, B, T):
    """Memory padding masks (True = pad). The original repeats the mask along the wrong axis
    (DM-GAN code/model.py Memory.forward, mask.repeat(queryL, 1)), which is right only when
    every sample has the same mask; ours is per sample (README, "Where we differ")."""
    m = torch.zeros(B, T, dtype=torch.bool)
    if kind == 'shared':
        m[:, -2:] = True
    elif kind == 'per_sample':
        m[1, -2:] = True
    return m


def d_input(x, size):
    return F.interpolate(x['d_base'], size=(size, size), mode='bilinear', align_corners=False)


def cnn_input(x, size):
    if size == x['images'].shape[-1]:
        return x['images']
    return F.interpolate(x['images'], size=(size, size), mode='bilinear', align_corners=False)


# ---- our modules, through the project's loaders ------------------------------------------------
def ours_generator(state, gcfg, folder):
    path = os.path.join(folder, 'bird_DMGAN.pth')  # a released G_NET file
    torch.save(state, path)
    cfg = NS(
        TRAIN=NS(NET_G=path),
        GAN=NS(**{k: gcfg[k] for k in ('GF_DIM', 'Z_DIM', 'CONDITION_DIM', 'R_NUM')}),
        TREE=NS(BRANCH_NUM=gcfg['BRANCH_NUM'], BASE_SIZE=gcfg['BASE_SIZE']),
    )
    return models.load_dmgan_generator(cfg, gcfg['EMBEDDING_DIM'], 'cpu')


def ours_discriminator(state, size, df_dim, text_dim, folder, sn_eval_power_iteration=True):
    path = os.path.join(folder, 'netD.pth')
    torch.save(state, path)
    netD = models.DMGANDiscriminator(size, df_dim, text_dim, sn_eval_power_iteration)
    netD.load_state_dict(models.convert_dmgan_state_dict(utils.load_weights(path)))
    return netD


def ours_encoders(text_state, image_state, words_num, folder, align_corners=None):
    torch.save(text_state, os.path.join(folder, 'text_encoder200.pth'))
    torch.save(image_state, os.path.join(folder, 'image_encoder200.pth'))
    n = text_state['encoder.weight'].shape[0]
    words = ['<end>'] + [f'w{i}' for i in range(1, n)]  # captions.pickle's ixtoword
    return models.load_encoders(
        os.path.join(folder, 'text_encoder200.pth'),
        attngan_words=lambda: words,
        words_num=words_num,
        align_corners=align_corners,
    )


class fixed_ca_noise:
    """Our CANet draws its noise with torch.randn_like; during the call it returns `eps`."""

    def __init__(self, eps):
        self.eps = eps

    def __enter__(self):
        self.real = torch.randn_like

        def randn_like(t, **kw):
            assert t.shape == self.eps.shape, (t.shape, self.eps.shape)
            return self.eps.to(t.dtype)

        torch.randn_like = randn_like

    def __exit__(self, *exc):
        torch.randn_like = self.real


def _first_arg(store, name, pos):
    return lambda m, args: store.__setitem__(name, args[pos])


def run_ours_g(netG, x, mask, train):
    seen = {}
    h = netG.init_stage.register_forward_pre_hook(_first_arg(seen, 'c', 1))
    netG.train(train)
    try:
        with torch.no_grad(), fixed_ca_noise(x['eps']):
            imgs, atts, mu, logvar = netG(x['z'], x['sent'], x['words'], mask)
    finally:
        h.remove()
    out = {f'img{i}': v for i, v in enumerate(imgs)}
    out.update({f'att{i + 1}': v for i, v in enumerate(atts)})
    out.update(mu=mu, logvar=logvar, c=seen['c'])
    return out


def sn_vectors(converted_state):
    keys = sorted(k for k in converted_state if k.endswith(('weight_u', 'weight_v')))
    return torch.cat([converted_state[k].flatten() for k in keys])


def run_ours_d(netD, x, size, train):
    netD.train(train)  # train: one power iteration per forward, as the original always does
    with torch.no_grad():
        code = netD(d_input(x, size))
        cond, uncond = netD.cond(code, x['sent']), netD.uncond(code)
    return {
        'code': code,
        'cond_logit': cond,
        'uncond_logit': uncond,
        'cond_prob': torch.sigmoid(cond),  # the original's outlogits end in a sigmoid
        'uncond_prob': torch.sigmoid(uncond),
        'sn_u_v': sn_vectors(netD.state_dict()),
    }


def run_ours_rnn(te, x, perm=None):
    caps, lens = x['captions'], x['cap_lens']
    if perm is not None:  # ours packs unsorted batches; the outputs come back in its order
        caps, lens = caps[perm], lens[perm]
    with torch.no_grad():
        words, sent, pad = te(caps, lens)
    assert torch.equal(pad, torch.arange(caps.shape[1])[None] >= lens[:, None])
    if perm is not None:
        inv = torch.argsort(perm)
        words, sent = words[inv], sent[inv]
    return {'words': words, 'sent': sent}


def run_ours_cnn(ie, x, size, train):
    before = {k: v.clone() for k, v in ie.state_dict().items()}
    ie.train(train)  # train: BatchNorm on batch statistics, as AttnGAN's cnn_model.train()
    with torch.no_grad():
        regions, code = ie(cnn_input(x, size))
    ie.eval().load_state_dict(before)  # train mode moved the running statistics
    return {'features': regions, 'cnn_code': code}


def run_ours(check, nets, folder, cache, dtype=torch.float64):
    """Our outputs for one check, from the weights and inputs alone (the fixture test calls this;
    `cache` keeps the encoders between checks). The weights load as float32 (the files' type),
    then run in `dtype`."""
    x, kind = cast(check['inputs'], dtype), check['net']
    if kind == 'G_NET':
        netG = ours_generator(nets['G_NET']['state'], nets['G_NET']['cfg'], folder).to(dtype)
        return run_ours_g(
            netG, x, pad_mask(check['mask'], BATCH, x['words'].shape[2]), check['train']
        )
    if kind.startswith('D_NET'):
        d = nets[kind]
        state = converged_sn(d['state']) if check.get('converged_sn') else d['state']
        netD = ours_discriminator(
            state,
            d['size'],
            d['df_dim'],
            d['text_dim'],
            folder,
            check.get('sn_eval_power_iteration', True),
        ).to(dtype)
        return run_ours_d(netD, x, d['size'], check['train'])
    # net_e_align_corners: main.py's TRAIN.NET_E_ALIGN_CORNERS; None: the file's own (AttnGAN's)
    align = check.get('net_e_align_corners')
    if ('encoders', align) not in cache:
        cache['encoders', align] = [
            m.to(dtype)
            for m in ours_encoders(
                nets['RNN_ENCODER']['state'],
                nets['CNN_ENCODER']['state'],
                check['words_num'],
                folder,
                align,
            )
        ]
    te, ie = cache['encoders', align]
    if kind == 'RNN_ENCODER':
        return run_ours_rnn(te, x, check.get('perm'))
    return run_ours_cnn(ie, x, check['size'], check['train'])


# ---- the original modules' outputs ------------------------------------------------------------
def run_original_g(net, x, mask, train):
    seen = {}
    h = net.h_net1.register_forward_pre_hook(_first_arg(seen, 'c', 1))
    net.train(train)
    try:
        torch.manual_seed(int(x['eps_seed']))  # CA_NET draws x['eps'] again
        with torch.no_grad():
            imgs, atts, mu, logvar = net(x['z'], x['sent'], x['words'], mask, x['cap_lens'])
    finally:
        h.remove()
    out = {f'img{i}': v for i, v in enumerate(imgs)}
    out.update({f'att{i + 1}': v for i, v in enumerate(atts)})
    out.update(mu=mu, logvar=logvar, c=seen['c'])
    return out


def run_original_d(net, x, size):
    logits = {}
    hooks = [
        getattr(net, part)
        .outlogits[0]
        .register_forward_hook(
            lambda m, a, out, name=name: logits.__setitem__(name, out.reshape(-1))
        )
        for part, name in (('COND_DNET', 'cond_logit'), ('UNCOND_DNET', 'uncond_logit'))
    ]
    try:
        with torch.no_grad():
            code = net(d_input(x, size))
            cond, uncond = net.COND_DNET(code, x['sent']), net.UNCOND_DNET(code)
    finally:
        for h in hooks:
            h.remove()
    return {
        'code': code,
        **logits,
        'cond_prob': cond,
        'uncond_prob': uncond,
        'sn_u_v': sn_vectors(models.convert_dmgan_state_dict(net.state_dict())),
    }


def run_original_rnn(net, x):
    caps, lens = x['captions'], x['cap_lens']
    with torch.no_grad():
        words, sent = net(caps, lens, net.init_hidden(caps.shape[0]))
    return {'words': words, 'sent': sent}


def run_original_cnn(net, x, size, train):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train(train)
    with torch.no_grad():
        features, code = net(cnn_input(x, size))
    net.eval().load_state_dict(before)
    return {'features': features, 'cnn_code': code}


# ---- comparison -------------------------------------------------------------------------------
def compare(ours, ref):
    rows = {}
    for k, r in ref.items():
        o = ours.get(k)
        if o is None or tuple(o.shape) != tuple(r.shape):
            rows[k] = (math.inf, float(r.abs().max()), math.inf)
            continue
        d, s = float((o.double() - r.double()).abs().max()), float(r.abs().max())
        rows[k] = (d, s, d / max(s, 1e-30))
    return rows


def stored(t):
    """What the fixture keeps of an output: the full tensor when small, else every n-th pixel
    (at most 16 x 16), and the sum and absolute sum of the full tensor (float64)."""
    sub = t
    if t.dim() == 4 and t.shape[-1] > 16:
        step = math.ceil(t.shape[-1] / 16)
        sub = t[..., ::step, ::step]
    return {
        'sub': sub.contiguous().clone(),
        'sum': t.double().sum(),
        'abs_sum': t.double().abs().sum(),
    }


def compare_stored(ours, ref):
    rows = {}
    for k, r in ref.items():
        o = stored(ours[k]) if k in ours else None
        if o is None or o['sub'].shape != r['sub'].shape:
            rows[k] = (math.inf, float(r['sub'].abs().max()), math.inf)
            continue
        d, s = (
            float((o['sub'].double() - r['sub'].double()).abs().max()),
            float(r['sub'].abs().max()),
        )
        # the sum over every element, relative to the sum of magnitudes
        sum_rel = float((o['sum'] - r['sum']).abs() / max(float(r['abs_sum']), 1e-30))
        rows[k] = (d, s, max(d / max(s, 1e-30), sum_rel))
    return rows


def print_rows(results, tol):
    bad = 0
    print(f"{'check':<44} {'output':<13} {'max|diff|':>10} {'max|orig|':>10} {'ratio':>9}  status")
    for check, rows in results:
        for k, (d, s, r) in rows.items():
            if check.get('deviation'):
                status = f"deviation: {check['deviation']}"
            else:
                status = 'ok' if r <= tol else 'FAIL'
                bad += status == 'FAIL'
            print(f"{check['name']:<44} {k:<13} {d:10.3g} {s:10.3g} {r:9.2g}  {status}")
    return bad


# ---- the checks -------------------------------------------------------------------------------
def build_checks(dm, an, dm_cfg, an_cfg, tiny):
    """The original modules with seeded weights, the state dicts and the list of checks."""
    torch.manual_seed(0)  # the constructors' own init, replaced below
    gcfg = {
        'GF_DIM': dm_cfg.GAN.GF_DIM,
        'Z_DIM': dm_cfg.GAN.Z_DIM,
        'CONDITION_DIM': dm_cfg.GAN.CONDITION_DIM,
        'R_NUM': dm_cfg.GAN.R_NUM,
        'BRANCH_NUM': dm_cfg.TREE.BRANCH_NUM,
        'BASE_SIZE': dm_cfg.TREE.BASE_SIZE,
        'EMBEDDING_DIM': dm_cfg.TEXT.EMBEDDING_DIM,
    }
    originals, nets = {}, {}

    def seed_net(name, net, seed):
        state = seeded_state(layout(net), seed)
        net.load_state_dict(state)  # strict: the layout is the net's own
        originals[name] = net.eval()
        nets[name] = {'state': {k: v.clone() for k, v in net.state_dict().items()}}

    seed_net('G_NET', dm.G_NET(), 10)
    nets['G_NET']['cfg'] = gcfg
    for i, (cls, size) in enumerate(((dm.D_NET64, 64), (dm.D_NET128, 128), (dm.D_NET256, 256))):
        name = f'D_NET{size}'
        seed_net(name, cls(b_jcu=True), 20 + i)
        nets[name].update(size=size, df_dim=dm_cfg.GAN.DF_DIM, text_dim=dm_cfg.TEXT.EMBEDDING_DIM)
    n_words = TINY_WORDS if tiny else FULL_WORDS
    E = an_cfg.TEXT.EMBEDDING_DIM
    # pretrain_DAMSM.py: RNN_ENCODER(dataset.n_words, nhidden=cfg.TEXT.EMBEDDING_DIM), CNN_ENCODER(E)
    seed_net('RNN_ENCODER', an.RNN_ENCODER(n_words, nhidden=E), 30)
    random_inception(an)
    seed_net('CNN_ENCODER', an.CNN_ENCODER(E), 31)
    # DM-GAN's copies of the two encoders, with the same weights
    dm_rnn = dm.RNN_ENCODER(n_words, nhidden=E)
    dm_rnn.load_state_dict(nets['RNN_ENCODER']['state'])
    random_inception(dm)
    dm_cnn = dm.CNN_ENCODER(E)
    dm_cnn.load_state_dict(nets['CNN_ENCODER']['state'])
    originals.update(dm_RNN_ENCODER=dm_rnn.eval(), dm_CNN_ENCODER=dm_cnn.eval())
    nets['CNN_ENCODER'].update(seed=31, layout=layout(dm_cnn))

    x = make_inputs(dm_cfg, n_words)
    T = dm_cfg.TEXT.WORDS_NUM
    checks = [
        dict(name='G_NET eval, no padding', net='G_NET', mask='none', train=False),
        dict(
            name='G_NET eval, padding shared by the batch', net='G_NET', mask='shared', train=False
        ),
        dict(name='G_NET train (BN batch statistics)', net='G_NET', mask='shared', train=True),
        dict(
            name='G_NET eval, padding per sample',
            net='G_NET',
            mask='per_sample',
            train=False,
            deviation="the original's mask mixes samples (README: per-sample mask, a fix)",
        ),
    ]
    sn_eval = dmgan_main.DEFAULTS['GAN']['SN_EVAL_POWER_ITERATION']
    for size in (64, 128, 256):
        checks += [
            dict(
                name=f'D_NET{size} (power iteration each forward)', net=f'D_NET{size}', train=True
            ),
            dict(
                name=f'D_NET{size} eval (power iteration too)',
                net=f'D_NET{size}',
                train=False,
                sn_eval_power_iteration=sn_eval,
            ),
            dict(
                name=f'D_NET{size} eval, no eval power iteration',
                net=f'D_NET{size}',
                train=False,
                converged_sn=True,
                sn_eval_power_iteration=False,
                deviation='GAN.SN_EVAL_POWER_ITERATION false: u/v frozen in eval',
            ),
        ]
    for who in ('AttnGAN', 'DM-GAN'):
        checks += [
            dict(name=f'{who} RNN_ENCODER eval', net='RNN_ENCODER', who=who, words_num=T),
            dict(
                name=f'{who} RNN_ENCODER eval, ours unsorted',
                net='RNN_ENCODER',
                who=who,
                words_num=T,
                perm=torch.tensor([1, 2, 0]),
            ),
        ]
    checks += [
        dict(
            name='AttnGAN CNN_ENCODER eval, 299 px',
            net='CNN_ENCODER',
            who='AttnGAN',
            size=299,
            train=False,
        ),
        dict(
            name='AttnGAN CNN_ENCODER eval, 64 px',
            net='CNN_ENCODER',
            who='AttnGAN',
            size=64,
            train=False,
        ),
        dict(
            name='AttnGAN CNN_ENCODER train, 64 px',
            net='CNN_ENCODER',
            who='AttnGAN',
            size=64,
            train=True,
        ),
    ]
    dm_align = dmgan_main.DEFAULTS['TRAIN']['NET_E_ALIGN_CORNERS']
    checks += [
        dict(
            name='DM-GAN CNN_ENCODER eval, 299 px',
            net='CNN_ENCODER',
            who='DM-GAN',
            size=299,
            train=False,
            net_e_align_corners=dm_align,
        ),
        dict(
            name='DM-GAN CNN_ENCODER eval, 64 px',
            net='CNN_ENCODER',
            who='DM-GAN',
            size=64,
            train=False,
            net_e_align_corners=dm_align,
        ),
        dict(
            name='DM-GAN CNN_ENCODER eval, 64 px, False',
            net='CNN_ENCODER',
            who='DM-GAN',
            size=64,
            train=False,
            net_e_align_corners=False,
            deviation='TRAIN.NET_E_ALIGN_CORNERS false: AttnGAN-today resize to 299',
        ),
    ]
    for c in checks:
        c['inputs'] = x
        c.setdefault('words_num', T)
    return originals, nets, checks


def run_original(check, originals, dtype):
    x, kind = cast(check['inputs'], dtype), check['net']
    if kind == 'G_NET':
        net = originals['G_NET']
        out = run_original_g(
            net, x, pad_mask(check['mask'], BATCH, x['words'].shape[2]), check['train']
        )
        net.load_state_dict(originals['_states']['G_NET'])  # train mode moved the BN statistics
        return out
    if kind.startswith('D_NET'):
        net = originals[kind]
        if check.get('converged_sn'):
            net.load_state_dict(converged_sn(originals['_states'][kind]))
        out = run_original_d(net, x, int(kind[5:]))
        net.load_state_dict(originals['_states'][kind])  # the power iteration moved u and v
        return out
    pre = '' if check['who'] == 'AttnGAN' else 'dm_'
    if kind == 'RNN_ENCODER':
        return run_original_rnn(originals[pre + 'RNN_ENCODER'], x)
    return run_original_cnn(originals[pre + 'CNN_ENCODER'], x, check['size'], check['train'])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dmgan_code', required=True, help='MinfengZhu/DM-GAN code/ folder')
    p.add_argument('--attngan_code', required=True, help='taoxugit/AttnGAN code/ folder')
    p.add_argument('--dmgan_cfg', default='', help='default: DMGAN_CODE/cfg/bird_DMGAN.yml')
    p.add_argument('--attngan_cfg', default='', help='default: ATTNGAN_CODE/cfg/DAMSM/bird.yml')
    p.add_argument('--tiny', action='store_true', help='small widths (the test fixture)')
    p.add_argument('--tol', type=float, default=TOL)
    p.add_argument(
        '--dtype',
        default='float64',
        choices=('float64', 'float32'),
        help='float64 (default) leaves no rounding to mistake for a difference',
    )
    p.add_argument('--save', default='', help='write the fixture here (with --tiny)')
    args = p.parse_args(argv)
    if args.save and not args.tiny:
        p.error('--save keeps the --tiny setting only (the full one is ~100 MB)')

    dm, an = import_original(args.dmgan_code), import_original(args.attngan_code)
    dm_cfg = configure(
        dm, args.dmgan_cfg or os.path.join(args.dmgan_code, 'cfg/bird_DMGAN.yml'), args.tiny
    )
    an_cfg = configure(
        an, args.attngan_cfg or os.path.join(args.attngan_code, 'cfg/DAMSM/bird.yml'), args.tiny
    )
    if an_cfg.TEXT.EMBEDDING_DIM != dm_cfg.TEXT.EMBEDDING_DIM:
        p.error('the two cfgs give different TEXT.EMBEDDING_DIM')
    print(
        f"DM-GAN {git_head(args.dmgan_code)}, AttnGAN {git_head(args.attngan_code)}; "
        f"GF_DIM {dm_cfg.GAN.GF_DIM}, DF_DIM {dm_cfg.GAN.DF_DIM}, EMBEDDING_DIM "
        f"{dm_cfg.TEXT.EMBEDDING_DIM}, R_NUM {dm_cfg.GAN.R_NUM}, WORDS_NUM {dm_cfg.TEXT.WORDS_NUM}, "
        f"batch {BATCH}, {args.dtype}, torch {torch.__version__}"
    )
    print(
        "(CNN_ENCODER's 'Load pretrained model' line below is its own print: nothing is downloaded)"
    )
    dtype = getattr(torch, args.dtype)
    originals, nets, checks = build_checks(dm, an, dm_cfg, an_cfg, args.tiny)
    originals['_states'] = {k: v['state'] for k, v in nets.items()}
    for k, net in originals.items():
        if k != '_states':
            net.to(dtype)
    results, cache = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for check in checks:
            ref = run_original(check, originals, dtype)
            ours = run_ours(check, nets, folder, cache, dtype)
            check['ref'] = ref
            results.append((check, compare(ours, ref)))
    bad = print_rows(results, args.tol)
    print(
        f"{bad} of {sum(not c.get('deviation') for c, _ in results)} equality checks above {args.tol:g}"
    )
    if args.save:
        cnn = nets['CNN_ENCODER']
        cnn['fingerprint'] = fingerprint(cnn.pop('state'))  # 25M values: rebuilt from the seed
        fixture = {
            'made_with': 'python bench/parity_originals.py --dmgan_code DM-GAN/code '
            '--attngan_code AttnGAN/code --tiny --save ' + args.save,
            'originals': f'MinfengZhu/DM-GAN {git_head(args.dmgan_code)}, '
            f'taoxugit/AttnGAN {git_head(args.attngan_code)}; code/model.py',
            'torch': str(torch.__version__),
            'tol': args.tol,
            'dtype': args.dtype,
            'nets': nets,
            'checks': [
                {
                    **{k: v for k, v in c.items() if k != 'ref'},
                    'ref': {k: stored(v) for k, v in c['ref'].items()},
                }
                for c in checks
                if not c.get('deviation')  # what the fixture's test asserts: the equalities
            ],
        }
        torch.save(fixture, args.save)
        print(f"wrote {args.save} ({os.path.getsize(args.save) / 1e6:.2f} MB)")
    return 1 if bad else 0


def rebuild_cnn_state(entry):
    """The fixture's CNN_ENCODER weights: seeded_state over the stored layout, checked against
    the fingerprint the bench recorded."""
    state = seeded_state(entry['layout'], entry['seed'])
    got, want = fingerprint(state), entry['fingerprint']
    if abs(got[0] - want[0]) > 1e-6 * want[1] or abs(got[1] - want[1]) > 1e-6 * want[1]:
        raise AssertionError(
            f"seeded CNN_ENCODER weights {got} differ from the bench's {want}: torch's generator "
            "changed; rerun the bench's --save command"
        )
    return state


if __name__ == '__main__':
    sys.exit(main())
