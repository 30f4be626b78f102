"""The networks of t2i-repro, and the loaders that rebuild them from their files, in
one section per paper. Each section is owned by the script family that uses it; scripts
import from here (and from utils), never from each other."""

import math
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils  # AttnGAN tokenisation, UserError, checkpoints, weights files


# ============================================================================
# Evaluation networks: FID Inception-v3 (pytorch-fid layout), the shapes judge
# ============================================================================
# [section: evaluation]
# The FID Inception-v3 is the TF graph `inception-2015-12-05` as pytorch-fid ports it
# (pytorch-fid inception.py): torchvision's Inception3 module names, so the file
# pt_inception-2015-12-05-6726825d.pth loads with strict=True, and the TF graph's own
# blocks: average pools that ignore padding, a max pool in the last block, 1008 classes.
class InceptionConv(nn.Module):
    """Inception's unit: conv without bias, BatchNorm (eps 1e-3, the TF graph's), ReLU."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def tf_avg_pool(x):
    """The TF graph's 3x3 average pool: padded positions are left out of the mean."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def stem_pool(x):
    return F.max_pool2d(x, 3, stride=2)


class InceptionBlockA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = InceptionConv(cin, 64, kernel_size=1)
        self.branch5x5_1 = InceptionConv(cin, 48, kernel_size=1)
        self.branch5x5_2 = InceptionConv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = InceptionConv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = InceptionConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = InceptionConv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = InceptionConv(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(tf_avg_pool(x)),
            ],
            1,
        )


class InceptionBlockB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = InceptionConv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = InceptionConv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = InceptionConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = InceptionConv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionBlockC(nn.Module):
    """Mixed_6b..6e (17x17): factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, cin, c7):
        super().__init__()
        h, v = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = InceptionConv(cin, 192, kernel_size=1)
        self.branch7x7_1 = InceptionConv(cin, c7, kernel_size=1)
        self.branch7x7_2 = InceptionConv(c7, c7, **h)
        self.branch7x7_3 = InceptionConv(c7, 192, **v)
        self.branch7x7dbl_1 = InceptionConv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = InceptionConv(c7, c7, **v)
        self.branch7x7dbl_3 = InceptionConv(c7, c7, **h)
        self.branch7x7dbl_4 = InceptionConv(c7, c7, **v)
        self.branch7x7dbl_5 = InceptionConv(c7, 192, **h)
        self.branch_pool = InceptionConv(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = self.branch7x7dbl_1(x)
        for m in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            dbl = m(dbl)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                dbl,
                self.branch_pool(tf_avg_pool(x)),
            ],
            1,
        )


class InceptionBlockD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = InceptionConv(cin, 192, kernel_size=1)
        self.branch3x3_2 = InceptionConv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = InceptionConv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = InceptionConv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = InceptionConv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = InceptionConv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1
        )


class InceptionBlockE(nn.Module):
    """Mixed_7b/7c (8x8): expanded 1x3 + 3x1 branches. The TF graph pools with an
    average (padding left out) in Mixed_7b but a max in Mixed_7c (`max_pool=True`)."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = InceptionConv(cin, 320, kernel_size=1)
        self.branch3x3_1 = InceptionConv(cin, 384, kernel_size=1)
        self.branch3x3_2a = InceptionConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = InceptionConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = InceptionConv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = InceptionConv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = InceptionConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = InceptionConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = InceptionConv(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(dbl),
                self.branch3x3dbl_3b(dbl),
                self.branch_pool(pool),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """The FID network. forward(x) takes RGB in [0, 1] at any size, resizes to 299
    (bilinear, align_corners=False) and scales to [-1, 1] as pytorch-fid does, and
    returns the spatially averaged output of the block that gives `dims` features:
    64 (first max pool), 192 (second max pool), 768 (Mixed_6e), 2048 (pool3).
    logits(pool3) are the 1008-way logits without the fc bias, as the original
    Inception Score (improved-gan inception_score/model.py) and torch-fidelity
    ('logits_unbiased') take them."""

    DIMS = (64, 192, 768, 2048)

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = InceptionConv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = InceptionConv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = InceptionConv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = InceptionConv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = InceptionConv(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionBlockA(192, pool_features=32)
        self.Mixed_5c = InceptionBlockA(256, pool_features=64)
        self.Mixed_5d = InceptionBlockA(288, pool_features=64)
        self.Mixed_6a = InceptionBlockB(288)
        self.Mixed_6b = InceptionBlockC(768, c7=128)
        self.Mixed_6c = InceptionBlockC(768, c7=160)
        self.Mixed_6d = InceptionBlockC(768, c7=160)
        self.Mixed_6e = InceptionBlockC(768, c7=192)
        self.Mixed_7a = InceptionBlockD(768)
        self.Mixed_7b = InceptionBlockE(1280, max_pool=False)
        self.Mixed_7c = InceptionBlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x, dims=2048):
        if dims not in self.DIMS:
            raise ValueError(f"dims={dims}: expected one of {self.DIMS}")
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1
        blocks = [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, stem_pool],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, stem_pool],
            [
                self.Mixed_5b,
                self.Mixed_5c,
                self.Mixed_5d,
                self.Mixed_6a,
                self.Mixed_6b,
                self.Mixed_6c,
                self.Mixed_6d,
                self.Mixed_6e,
            ],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c],
        ]
        for block in blocks[: self.DIMS.index(dims) + 1]:
            for m in block:
                x = m(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def logits(self, pool3):
        return pool3 @ self.fc.weight.t()

    def fused(self):
        """A copy for fast inference computing the same function: every BatchNorm folded
        into its convolution (w * g / sqrt(v + eps), bias b - m * g / sqrt(v + eps),
        folded in float64) and channels_last memory. Only float32 rounding differs from
        the unfused network (tests/test_metrics.py measures it against pytorch-fid)."""
        net = FIDInceptionV3()
        net.load_state_dict(self.state_dict())
        for unit in net.modules():
            if isinstance(unit, InceptionConv):
                bn = unit.bn
                scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                weight = unit.conv.weight.double() * scale[:, None, None, None]
                unit.conv.weight = nn.Parameter(weight.float())
                unit.conv.bias = nn.Parameter(
                    (bn.bias.double() - bn.running_mean.double() * scale).float()
                )
                unit.bn = nn.Identity()
        return net.eval().requires_grad_(False).to(memory_format=torch.channels_last)


class ShapesJudge(nn.Module):
    """The synthetic dataset's own judge (project-defined; in the spirit of SOA's
    detector for COCO): a small CNN whose features are pooled onto the dataset's 3x3
    grid of cells, and one shared head per cell predicting whether an object sits
    there and its shape, colour and size. Objects occupy distinct cells
    (preprocess_data.sample_scene), so the occupied cells in reading order are the
    objects of attributes.json. Input: RGB in [-1, 1] at any size (resized to
    `image_size`). `features` (9 cells x cell_dim) serve as the "shapes FID" features."""

    def __init__(self, n_shapes=6, n_colours=8, n_sizes=2, width=32, cell_dim=32, image_size=64):
        super().__init__()
        self.image_size, self.splits = image_size, [1, n_shapes, n_colours, n_sizes]

        def unit(cin, cout, k, stride):
            return [
                nn.Conv2d(cin, cout, k, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.backbone = nn.Sequential(
            *unit(3, w, 4, 2),
            *unit(w, 2 * w, 3, 2),
            *unit(2 * w, 2 * w, 3, 1),
            *unit(2 * w, 4 * w, 3, 2),
            *unit(4 * w, 4 * w, 3, 1),
        )  # 64 -> 8x8
        self.cell = nn.Sequential(nn.Conv2d(4 * w, cell_dim, 1), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(cell_dim, sum(self.splits), 1)

    def cells(self, x):
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode='bilinear',
                align_corners=False,
                antialias=True,
            )
        return self.cell(F.adaptive_avg_pool2d(self.backbone(x), 3))  # (N, cell_dim, 3, 3)

    @property
    def resize(self):
        """What cells() does to an image of another size, as a score's protocol records it."""
        return f'antialiased bilinear to {self.image_size} px where sizes differ'

    def features(self, x):
        return self.cells(x).flatten(1)

    def forward(self, x):
        """Per cell (reading order): objectness logit, shape, colour and size logits."""
        out = self.head(self.cells(x)).flatten(2).transpose(1, 2)  # (N, 9, 1+6+8+2)
        return torch.split(out, self.splits, dim=-1)


def judge_loss(out, targets):
    """ShapesJudge's training loss against utils.cell_targets: objectness (BCE) on all 9 cells;
    shape, colour, size (CE) on the occupied cells only (an empty cell has no attributes)."""
    occ, shape, colour, size = out
    full = targets[..., 0] == 1
    return (
        F.binary_cross_entropy_with_logits(occ[..., 0], full.float())
        + F.cross_entropy(shape[full], targets[full][:, 1])
        + F.cross_entropy(colour[full], targets[full][:, 2])
        + F.cross_entropy(size[full], targets[full][:, 3])
    )


# ---- loading them (weights files found by utils.weights_path), and FID's feature network -------
# What FID's and IS's Inceptions do to every image, the resizing a score's protocol records
# (pytorch-fid inception.py InceptionV3.forward; sbarratt's inception_score.py, its nn.Upsample).
INCEPTION_RESIZE = 'bilinear to 299 px, align_corners=False'


def fid_inception(weights=None, device='cpu', exact=False):
    """The FID Inception with pytorch-fid's weights: BatchNorm folded and channels_last
    for speed, or (exact) computed as pytorch-fid computes it, bit for bit."""
    path = utils.weights_path(
        weights,
        utils.FID_WEIGHTS,
        utils.FID_WEIGHTS_URL,
        '; for the synthetic dataset use --judge output/judge instead (shapes FID)',
    )
    net = utils.load_state_dict(FIDInceptionV3(), path)
    net = net.eval().requires_grad_(False) if exact else net.fused()
    net.weights_path = path  # the evaluation protocol names the file it scored with
    return net.to(device)


def inception_classifier(net, weights, device):
    """images in [0, 1] -> logits, for --net tf or torchvision; its weights_path names the file."""
    if net == 'tf':
        inc = fid_inception(weights, device)

        def classify(x):
            return inc.logits(inc(x.contiguous(memory_format=torch.channels_last), 2048))

        classify.weights_path = inc.weights_path
        return classify
    if net == 'torchvision':
        import torchvision

        tv = torchvision.models.inception_v3(
            weights=None, aux_logits=True, transform_input=False, init_weights=False
        )
        path = utils.weights_path(
            weights, utils.TV_INCEPTION_WEIGHTS, utils.TV_INCEPTION_WEIGHTS_URL
        )
        tv = utils.load_state_dict(tv, path).eval().requires_grad_(False).to(device)

        def classify(x):  # sbarratt: inputs in [-1, 1], bilinear upsampling to 299
            return tv(
                2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
            )

        classify.weights_path = path
        return classify
    raise utils.UserError(f"--net {net}: expected tf or torchvision")


def load_judge(path, device='cpu'):
    """A trained judge from its run dir or checkpoint; it carries its dataset's attributes."""
    if os.path.isdir(path):
        path = os.path.join(path, 'checkpoints', 'judge_final.pt')
    ckpt = utils.load_checkpoint(path, 'judge')
    judge = ShapesJudge(**ckpt['extra']['model'])
    judge.load_state_dict(ckpt['models']['judge'])
    judge.attributes = ckpt['extra']['attributes']
    judge.weights_path = path  # the evaluation protocol names the file it scored with
    return judge.to(device).eval().requires_grad_(False)


def feature_net(dims=2048, weights=None, judge=None, device='cpu', exact=False):
    """FID's features: the FID Inception's `dims` (pytorch-fid's layers), or the judge's."""
    if judge is not None:
        j = load_judge(judge, device) if isinstance(judge, str) else judge
        dim = j.features(torch.zeros(1, 3, j.image_size, j.image_size, device=device)).shape[1]
        return utils.FeatureNet(
            lambda x: j.features(2 * x - 1),
            dim,
            f'shapes-judge-{dim}',
            j.weights_path,
            j.resize,
        )
    if dims not in FIDInceptionV3.DIMS:
        raise utils.UserError(f"--dims {dims}: expected one of {FIDInceptionV3.DIMS}")
    net = fid_inception(weights, device, exact)
    layout = torch.contiguous_format if exact else torch.channels_last
    return utils.FeatureNet(
        lambda x: net(x.contiguous(memory_format=layout), dims),
        dims,
        f'inception-{dims}',
        net.weights_path,
        INCEPTION_RESIZE,
    )


# ============================================================================
# Text/image encoders: DAMSM (AttnGAN/DM-GAN), CLIP finetuned, CLIP from scratch
# ============================================================================
# [section: encoders]
# One API for every family, so generators and metrics never ask which one they hold:
#   text encoder   encode(texts) -> words (B, D, T), sent (B, D), pad_mask (B, T) (True = padding)
#                  forward(ids, lengths) -> the same, on ids from its own .tokenizer
#   image encoder  encode(images) / forward(images) -> regions (B, D, h, w), global (B, D);
#                  images in [-1, 1] at any size (resized and normalised inside)
# Each module keeps a plain `spec` dict (family, sizes, vocabulary) from which
# build_text_encoder / build_image_encoder rebuild it; load_encoders reads the files
# pretrain_DAMSM.py writes. The families:
#   damsm    AttnGAN's RNN_ENCODER (bi-LSTM) and CNN_ENCODER (Inception-v3)  AttnGAN code/model.py
#   clip_hf  a transformers CLIP, finetuned with DAMSM + NT-Xent  T2I_CLIP-GAN DMGAN+CLIP/code
#   clip     CLIP from scratch as open_clip builds it (ModifiedResNet or ViT)  open_clip model.py
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing (clip.py _transform)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ATTNGAN_WORDS_NUM = (
    18  # AttnGAN's TEXT.WORDS_NUM (config.py default): its released encoders carry none
)


class TextEncoderTokenizer:
    """Text -> (ids (B, L) long, lengths (B,) long), padded to L = context_length.

    kind 'attngan': AttnGAN's word ids (lowercase, \\w+, ASCII; 0 = '<end>' pads; no start
        or end token). Long captions keep their first L words.
    kind 'words':   the same vocabulary plus '<sot>' and '<eot>' as the two largest ids (as
        in CLIP's BPE) for the transformers; the embedded runs need no external file.
    kind 'clip':    CLIP's BPE (transformers.CLIPTokenizer); 'bert': BERT WordPiece
        (BertTokenizer, e.g. the Chinese vocab.txt). Truncation keeps the end token.
    The vocabulary itself is in the spec, so a checkpoint carries its tokenizer."""

    def __init__(self, spec):
        self.spec, self.kind, self.context_length = spec, spec['kind'], spec['context_length']
        self.vocab_size = len(spec['vocab'])
        vocab = {w: i for i, w in enumerate(spec['vocab'])}
        if self.kind in ('attngan', 'words'):
            self.index, self.pad_id = vocab, 0
            self.sot, self.eot = (
                (vocab['<sot>'], vocab['<eot>']) if self.kind == 'words' else (None, None)
            )
        elif self.kind == 'clip':
            from transformers import CLIPTokenizer

            self.hf = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in spec['merges']])
            self.sot, self.eot, self.pad_id = (
                self.hf.bos_token_id,
                self.hf.eos_token_id,
                self.hf.pad_token_id,
            )
        else:
            from transformers import BertTokenizer

            self.hf = BertTokenizer(vocab=vocab)
            self.sot, self.eot, self.pad_id = (
                self.hf.cls_token_id,
                self.hf.sep_token_id,
                self.hf.pad_token_id,
            )
        self.has_specials = self.kind != 'attngan'

    def __call__(self, texts):
        L = self.context_length
        if self.kind in ('clip', 'bert'):
            enc = self.hf(
                list(texts),
                padding='max_length',
                truncation=True,
                max_length=L,
                return_tensors='pt',
            )
            return enc['input_ids'], enc['attention_mask'].sum(1)
        ids = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        lengths = torch.ones(len(texts), dtype=torch.long)
        for i, text in enumerate(texts):
            toks = [self.index[w] for w in utils.tokenize_attngan(text) if w in self.index]
            toks = [self.sot] + toks[: L - 2] + [self.eot] if self.sot is not None else toks[:L]
            if toks:
                ids[i, : len(toks)] = torch.tensor(toks)
                lengths[i] = len(toks)
        return ids, lengths

    def token_strings(self, ids, length):
        """The tokens of one caption as strings (for attention-map labels)."""
        ids = [int(t) for t in ids[:length]]
        if self.kind in ('clip', 'bert'):
            return [t.replace('</w>', '') for t in self.hf.convert_ids_to_tokens(ids)]
        return [self.spec['vocab'][t] for t in ids]


def tokenizer_spec(kind, context_length, path='', words=None):
    """A TextEncoderTokenizer spec. 'attngan'/'words': `words` = AttnGAN's ixtoword in id order
    (index 0 '<end>'); 'clip': CLIPTokenizer from a hub name or local folder; 'bert': a
    WordPiece vocab.txt, a folder holding one, or a hub name."""
    spec = {'kind': kind, 'context_length': int(context_length)}
    if kind in ('attngan', 'words'):
        spec['vocab'] = list(words) + (['<sot>', '<eot>'] if kind == 'words' else [])
        return spec
    tok = utils.load_hf_tokenizer(
        'clip' if kind == 'clip' else 'bert', path, f'MODEL.TOKENIZER_PATH={path}'
    )
    vocab = tok.get_vocab()
    spec['vocab'] = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if len(spec['vocab']) != max(vocab.values()) + 1:
        raise utils.UserError(f"{path}: tokenizer ids are not contiguous")
    if kind == 'clip':
        import json

        spec['merges'] = [
            list(m) if isinstance(m, (list, tuple)) else m.split(' ')
            for m in json.loads(tok.backend_tokenizer.to_str())['model']['merges']
        ]
    return spec


def _prepare(images, size, mean=None, std=None, align_corners=False):
    """[-1, 1] images at any size -> the network's input: bilinear resize to `size`
    (antialiased when shrinking), then (x+1)/2 normalised with mean/std when given
    (Inception takes [-1, 1], as AttnGAN feeds it)."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(
            images,
            size=(size, size),
            mode='bilinear',
            align_corners=align_corners,
            antialias=images.shape[-1] > size,
        )
    if mean is not None:
        m = images.new_tensor(mean).view(1, 3, 1, 1)
        s = images.new_tensor(std).view(1, 3, 1, 1)
        images = ((images + 1) / 2 - m) / s
    return images


def _word_features(states, lengths, keep_special):
    """Token states (B, T, D) -> words (B, D, T'), pad_mask (B, T'). Without specials the
    start token and the end token (at length-1) are dropped, as T2I_CLIP-GAN's
    rm_special_token; a caption without words keeps its end token."""
    T = states.shape[1]
    if keep_special:
        return states.transpose(1, 2), torch.arange(T, device=states.device)[None] >= lengths[
            :, None
        ]
    words = states[:, 1 : max(T - 1, 2)]
    n = (lengths - 2).clamp(min=1)
    return words.transpose(1, 2), torch.arange(words.shape[1], device=states.device)[None] >= n[
        :, None
    ]


class TextEncoder(nn.Module):
    def encode(self, texts):
        """Raw captions -> words (B, D, T), sent (B, D), pad_mask (B, T), on this module's device."""
        ids, lengths = self.tokenizer(texts)
        dev = next(self.parameters()).device
        return self(ids.to(dev), lengths.to(dev))

    def word_strings(self, text):
        """The words of one caption as the word features see them (attention-map labels)."""
        ids, lengths = self.tokenizer([text])
        toks = self.tokenizer.token_strings(ids[0], int(lengths[0]))
        return (
            toks
            if self.keep_special or not self.tokenizer.has_specials
            else toks[1:-1] or toks[-1:]
        )


class ImageEncoder(nn.Module):
    def encode(self, images):
        """Images in [-1, 1] -> regions (B, D, h, w), global (B, D)."""
        return self(images)


# ---- damsm: AttnGAN's encoders ---------------------------------------------------------------
class RNNTextEncoder(TextEncoder):
    """AttnGAN's RNN_ENCODER: Embedding(n_words, 300) initialised U(±0.1) -> dropout 0.5 ->
    1-layer bi-LSTM with D/2 units per direction. Words = the outputs (B, D, T); sentence =
    the two final hidden states concatenated (AttnGAN code/model.py RNN_ENCODER)."""

    def __init__(self, spec):
        super().__init__()
        self.spec, self.keep_special = spec, True
        self.tokenizer = TextEncoderTokenizer(spec['tokenizer'])
        self.encoder = nn.Embedding(self.tokenizer.vocab_size, spec['word_dim'])
        self.drop = nn.Dropout(spec['dropout'])
        self.rnn = nn.LSTM(spec['word_dim'], spec['dim'] // 2, batch_first=True, bidirectional=True)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)

    def forward(self, ids, lengths):
        T = ids.shape[1]
        x = nn.utils.rnn.pack_padded_sequence(
            self.drop(self.encoder(ids)), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, (h, _) = self.rnn(x)
        out = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)[0]
        sent = h.transpose(0, 1).reshape(ids.shape[0], -1)  # [forward; backward]
        return (
            out.transpose(1, 2),
            sent,
            torch.arange(T, device=ids.device)[None] >= lengths[:, None],
        )


INCEPTION_REGIONS = [
    'Conv2d_1a_3x3',
    'Conv2d_2a_3x3',
    'Conv2d_2b_3x3',
    'maxpool1',
    'Conv2d_3b_1x1',
    'Conv2d_4a_3x3',
    'maxpool2',
    'Mixed_5b',
    'Mixed_5c',
    'Mixed_5d',
    'Mixed_6a',
    'Mixed_6b',
    'Mixed_6c',
    'Mixed_6d',
    'Mixed_6e',
]
INCEPTION_GLOBAL = ['Mixed_7a', 'Mixed_7b', 'Mixed_7c']


def _small_cnn(width):
    """The embedded runs' stand-in for Inception (no ImageNet weights offline, and a
    trainable Inception is ~3 img/s on 2 CPU cores): conv stages of stride 2; regions after
    three (1/8 of the input), global after four."""

    def stage(cin, cout):
        return [
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    w = width
    return (
        nn.Sequential(*stage(3, w), *stage(w, 2 * w), *stage(2 * w, 4 * w)),
        nn.Sequential(*stage(4 * w, 8 * w)),
        4 * w,
        8 * w,
    )


class CNNImageEncoder(ImageEncoder):
    """AttnGAN's CNN_ENCODER: Inception-v3 up to Mixed_6e gives the 17x17x768 regions
    (conv1x1 to D, no bias); on through Mixed_7c and the 8x8 average pool, Linear(2048, D)
    gives the global code. Input bilinear to 299, in [-1, 1]. The backbone loads torchvision's
    ImageNet weights (load_inception_weights) and its weights are frozen unless
    spec['train_backbone'] (its BatchNorm statistics adapt in training unless spec['bn_stats'] is
    'frozen'); the two new layers start U(±0.1) (AttnGAN code/model.py
    CNN_ENCODER.init_trainable_weights).
    backbone 'small' swaps Inception for _small_cnn (embedded runs only)."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        if spec['backbone'] == 'inception_v3':
            import torchvision

            net = torchvision.models.inception_v3(
                weights=None, aux_logits=False, init_weights=False
            )
            self.to_regions = nn.Sequential(*[getattr(net, n) for n in INCEPTION_REGIONS])
            self.to_global = nn.Sequential(*[getattr(net, n) for n in INCEPTION_GLOBAL])
            c_reg, c_glob = 768, 2048
        elif spec['backbone'] == 'small':
            self.to_regions, self.to_global, c_reg, c_glob = _small_cnn(spec['width'])
        else:
            raise utils.UserError(
                f"MODEL.CNN.BACKBONE={spec['backbone']!r}: expected inception_v3 or small"
            )
        self.emb_features = nn.Conv2d(c_reg, spec['dim'], 1, bias=False)
        self.emb_cnn_code = nn.Linear(c_glob, spec['dim'])
        for p in (self.emb_features.weight, self.emb_cnn_code.weight):
            nn.init.uniform_(p, -0.1, 0.1)
        if not spec['train_backbone']:
            self.to_regions.requires_grad_(False)
            self.to_global.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        # A frozen backbone's BatchNorm: batch statistics, running ones updated ('adapt', as AttnGAN's
        # cnn_model.train()), or its saved statistics ('frozen'; specs saved before the key held it)
        if not self.spec['train_backbone'] and self.spec.get('bn_stats', 'frozen') == 'frozen':
            self.to_regions.eval()
            self.to_global.eval()
        return self

    def forward(self, images, regions=True):
        # spec['align_corners']: CNN_ENCODER's nn.Upsample(size=(299, 299), mode='bilinear') is
        # align_corners=True in DM-GAN's PyTorch 0.3.1 and False in AttnGAN's code on today's
        # PyTorch (code/model.py of both); checkpoints without the key were trained with False.
        x = self.to_regions(
            _prepare(
                images,
                self.spec['image_size'],
                align_corners=self.spec.get('align_corners', False),
            )
        )
        code = self.emb_cnn_code(self.to_global(x).mean((2, 3)))
        return self.emb_features(x), code


def load_inception_weights(encoder, path, log=None):
    """torchvision's ImageNet Inception-v3 into a CNNImageEncoder: `path` a .pth file, 'auto'
    = torchvision's cache (torch.hub dir), '' = keep the random init. A named file that is
    absent stops the run: a random frozen backbone would train DAMSM against noise."""
    if not path:
        return
    if path == 'auto':
        path = utils.hub_cached(utils.TV_INCEPTION_WEIGHTS)
    if not os.path.isfile(path):
        raise utils.UserError(
            f"{path}: Inception-v3 ImageNet weights not found (MODEL.PRETRAINED; 'auto' looks "
            "in torchvision's cache; '' trains from a random init)"
        )
    state = utils.load_weights(path)
    for part, layers in (('to_regions', INCEPTION_REGIONS), ('to_global', INCEPTION_GLOBAL)):
        own = {}
        for key, value in state.items():
            top, rest = key.split('.', 1)
            if top in layers:  # AuxLogits and fc are not used
                own[f'{layers.index(top)}.{rest}'] = value
        getattr(encoder, part).load_state_dict(own)
    if log:
        log.info(f"Inception-v3 ImageNet weights from {path}")


# ---- clip_hf: a transformers CLIP (T2I_CLIP-GAN) --------------------------------------------
class HFCLIPTextEncoder(TextEncoder):
    """T2I_CLIP-GAN's text side: the CLIP text transformer; sentence = text_projection of the
    end token's state; words = the token states (a Linear to D where the width differs; the
    original's ViT-B/32 has width 512 = D and uses them as they are), start and end tokens
    dropped unless spec['keep_special'] (T2I_CLIP-GAN DMGAN+CLIP/code/pretrain_DAMSM.py)."""

    def __init__(self, spec):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        self.spec, self.keep_special = spec, spec['keep_special']
        self.tokenizer = TextEncoderTokenizer(spec['tokenizer'])
        self.model = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(spec['config']))
        width = spec['config']['hidden_size']
        self.word_proj = nn.Linear(width, spec['dim']) if width != spec['dim'] else nn.Identity()

    def forward(self, ids, lengths):
        T = int(lengths.max())  # causal: states before T ignore the padding after it
        ids = ids[:, :T]
        mask = (torch.arange(T, device=ids.device)[None] < lengths[:, None]).long()
        states = self.model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        sent = self.model.text_projection(
            states[torch.arange(len(ids), device=ids.device), lengths - 1]
        )
        words, pad = _word_features(self.word_proj(states), lengths, self.keep_special)
        return words, sent, pad


class HFCLIPImageEncoder(ImageEncoder):
    """T2I_CLIP-GAN's image side: global = CLIP's image embedding (visual_projection of the
    class token); regions = the patch tokens (class token dropped: 7x7 = 49 for ViT-B/32 at
    224) through a new Linear(width, D) (the original's linear_subr). CLIP mean/std."""

    def __init__(self, spec):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        self.spec = spec
        self.model = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(spec['config']))
        self.linear_subr = nn.Linear(spec['config']['hidden_size'], spec['dim'])

    def forward(self, images, regions=True):
        out = self.model(
            pixel_values=_prepare(images, self.spec['config']['image_size'], CLIP_MEAN, CLIP_STD)
        )
        patches = self.linear_subr(out.last_hidden_state[:, 1:])
        g = int(round(patches.shape[1] ** 0.5))
        return patches.transpose(1, 2).reshape(len(patches), -1, g, g), out.image_embeds


# ---- clip: CLIP from scratch (open_clip's model configs) ------------------------------------
class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block (CLIP): x + attn(ln_1(x)); x + mlp(ln_2(x)), MLP ×4 with GELU.
    Attention through scaled_dot_product_attention (is_causal for the text)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x, causal):
        B, T, C = x.shape
        q, k, v = (
            self.in_proj(self.ln_1(x))
            .view(B, T, 3, self.heads, C // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.out_proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


def _init_blocks(blocks, width):
    """open_clip's TextTransformer init (std width^-0.5 for attention, scaled for projections)."""
    proj_std = width**-0.5 * (2 * len(blocks)) ** -0.5
    for b in blocks:
        nn.init.normal_(b.in_proj.weight, std=width**-0.5)
        nn.init.normal_(b.out_proj.weight, std=proj_std)
        nn.init.normal_(b.mlp[0].weight, std=(2 * width) ** -0.5)
        nn.init.normal_(b.mlp[2].weight, std=proj_std)


class CLIPTextTransformer(TextEncoder):
    """open_clip's text tower: token + learned position embeddings, causal pre-LN transformer,
    final LayerNorm, projection to D. The sentence is the state at the end token, i.e. the
    last real token (CLIP's EOT, BERT's [SEP]); the copied T2I code pooled at the largest id,
    which with BERT ids is some character, not [SEP] (text2img's open_clip copy, encode_text).
    Words = every token state projected to D. Causal attention lets us run only up to the
    longest caption in the batch: later positions cannot change earlier ones, so this is exact."""

    def __init__(self, spec):
        super().__init__()
        self.spec, self.keep_special = spec, spec['keep_special']
        self.tokenizer = TextEncoderTokenizer(spec['tokenizer'])
        W, L = spec['width'], self.tokenizer.context_length
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, W)
        self.positional_embedding = nn.Parameter(torch.randn(L, W) * 0.01)
        self.blocks = nn.ModuleList(
            [ResidualAttentionBlock(W, spec['heads']) for _ in range(spec['layers'])]
        )
        self.ln_final = nn.LayerNorm(W)
        self.text_projection = nn.Parameter(torch.randn(W, spec['dim']) * W**-0.5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        _init_blocks(self.blocks, W)

    def forward(self, ids, lengths):
        T = int(lengths.max())
        x = self.token_embedding(ids[:, :T]) + self.positional_embedding[:T]
        for blk in self.blocks:
            x = blk(x, causal=True)
        states = self.ln_final(x) @ self.text_projection
        sent = states[torch.arange(len(ids), device=ids.device), lengths - 1]
        words, pad = _word_features(states, lengths, self.keep_special)
        return words, sent, pad


class Bottleneck(nn.Module):
    """CLIP's ResNet bottleneck: 1x1, 3x3, 1x1 convs; stride by a 2x2 average pool before the
    last conv (anti-aliased), and an average pool before the 1x1 downsample conv."""

    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = (
            nn.Conv2d(planes, planes, 3, padding=1, bias=False),
            nn.BatchNorm2d(planes),
        )
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride > 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.avgpool(F.relu(self.bn2(self.conv2(out)), inplace=True))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean token (plus positions) attends over all positions.
    Only that query is computed (open_clip computes every position's and keeps the first).
    Regions: each position's value through the output projection (the same map the pooled
    vector is a convex combination of)."""

    def __init__(self, grid, width, heads, dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid**2 + 1, width) / width**0.5)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.c_proj = nn.Linear(width, dim)
        self.heads = heads
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(lin.weight, std=width**-0.5)

    def forward(self, x, regions=True):
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.positional_embedding

        def heads(t):
            return t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)

        v = self.v_proj(x)
        a = F.scaled_dot_product_attention(
            heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(v)
        )
        pooled = self.c_proj(a.transpose(1, 2).reshape(B, C))
        if not regions:
            return None, pooled
        return self.c_proj(v[:, 1:]).transpose(1, 2).reshape(B, -1, H, W), pooled


class ModifiedResNet(nn.Module):
    """CLIP's ResNet (open_clip RN50 = layers [3, 4, 6, 3], width 64): a three-conv stem with
    an average pool, four bottleneck stages, attention pooling with width*32/64 heads."""

    def __init__(self, layers, width, image_size, dim, head_width=64):
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(w // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(w // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(w // 2, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
        )
        stages, cin = [], w
        for i, n in enumerate(layers):
            planes = w * 2**i
            blocks = [Bottleneck(cin, planes, 1 if i == 0 else 2)] + [
                Bottleneck(planes * 4, planes) for _ in range(n - 1)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = planes * 4
        self.stages = nn.Sequential(*stages)
        self.attnpool = AttentionPool2d(image_size // 32, cin, cin // head_width, dim)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)  # each residual branch starts as identity

    def forward(self, x, regions=True):
        return self.attnpool(self.stages(self.stem(x)), regions)


class VisionTransformer(nn.Module):
    """CLIP's ViT: patch conv, class token, learned positions, ln_pre, transformer, ln_post,
    projection. Global = the class token; regions = the patch tokens, both projected to D."""

    def __init__(self, layers, width, image_size, patch_size, dim, head_width=64):
        super().__init__()
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((image_size // patch_size) ** 2 + 1, width)
        )
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            [ResidualAttentionBlock(width, width // head_width) for _ in range(layers)]
        )
        self.proj = nn.Parameter(scale * torch.randn(width, dim))

    def forward(self, x, regions=True):
        x = self.conv1(x)
        B, C, H, W = x.shape
        x = torch.cat([self.class_embedding.expand(B, 1, C), x.flatten(2).transpose(1, 2)], 1)
        x = self.ln_pre(x + self.positional_embedding)
        for blk in self.blocks:
            x = blk(x, causal=False)
        if not regions:
            return None, self.ln_post(x[:, 0]) @ self.proj
        x = self.ln_post(x) @ self.proj
        return x[:, 1:].transpose(1, 2).reshape(B, -1, H, W), x[:, 0]


class CLIPImageEncoder(ImageEncoder):
    """open_clip's image tower: ModifiedResNet when patch_size is 0, else a ViT of depth
    layers[0]. CLIP mean/std; `regions=False` skips the region map (not needed by the CLIP
    loss)."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        s = spec
        if s['patch_size'] > 0:
            if len(s['layers']) != 1:
                raise utils.UserError(
                    f"MODEL.CLIP.VISION_LAYERS={s['layers']}: a ViT (PATCH_SIZE > 0) "
                    "takes one entry, its depth"
                )
            self.net = VisionTransformer(
                s['layers'][0],
                s['width'],
                s['image_size'],
                s['patch_size'],
                s['dim'],
                s['head_width'],
            )
        else:
            if len(s['layers']) != 4:
                raise utils.UserError(
                    f"MODEL.CLIP.VISION_LAYERS={s['layers']}: a ResNet takes 4 stage depths"
                )
            self.net = ModifiedResNet(
                s['layers'], s['width'], s['image_size'], s['dim'], s['head_width']
            )

    def forward(self, images, regions=True):
        return self.net(_prepare(images, self.spec['image_size'], CLIP_MEAN, CLIP_STD), regions)


# ---- building, saving, loading ---------------------------------------------------------------
TEXT_ENCODERS = {'damsm': RNNTextEncoder, 'clip_hf': HFCLIPTextEncoder, 'clip': CLIPTextTransformer}
IMAGE_ENCODERS = {'damsm': CNNImageEncoder, 'clip_hf': HFCLIPImageEncoder, 'clip': CLIPImageEncoder}


def build_text_encoder(spec):
    return TEXT_ENCODERS[spec['family']](spec)


def build_image_encoder(spec):
    return IMAGE_ENCODERS[spec['family']](spec)


def newest_text_encoder(run_dir):
    """<run_dir>/checkpoints/text_encoder<N>.pth (or in run_dir itself) with the largest N."""
    for d in (os.path.join(run_dir, 'checkpoints'), run_dir):
        found = (
            [f for f in os.listdir(d) if re.fullmatch(r'text_encoder\d+\.pth', f)]
            if os.path.isdir(d)
            else []
        )
        if found:
            return os.path.join(d, max(found, key=lambda f: int(f[12:-4])))
    raise utils.UserError(
        f"{run_dir}: no text_encoder<N>.pth in it or its checkpoints/ (pretrain_DAMSM.py writes them)"
    )


def _attngan_image_key(key):
    """CNN_ENCODER name (Conv2d_1a_3x3.conv.weight, ...) -> CNNImageEncoder name."""
    top, rest = key.split('.', 1)
    for part, layers in (('to_regions', INCEPTION_REGIONS), ('to_global', INCEPTION_GLOBAL)):
        if top in layers:
            return f'{part}.{layers.index(top)}.{rest}'
    return key  # emb_features, emb_cnn_code


def attngan_damsm_modules(text_state, image_state, words, words_num, text_path):
    """AttnGAN's released DAMSM encoders (DAMSMencoders/bird/text_encoder200.pth + image_encoder200.pth,
    plain state dicts of RNN_ENCODER and CNN_ENCODER in AttnGAN code/model.py): sizes read off the
    weights, the vocabulary from the dataset's captions.pickle (`words` = ixtoword in id order), as
    the original rebuilds RNN_ENCODER(len(ixtoword)). Loaded strictly."""
    n_words, word_dim = text_state['encoder.weight'].shape
    if n_words != len(words):
        raise utils.UserError(
            f"{text_path}: an RNN_ENCODER over {n_words} words, but the dataset's "
            f"captions.pickle has {len(words)}; use the captions.pickle it was trained with"
        )
    text = build_text_encoder(
        {
            'family': 'damsm',
            'dim': 2 * text_state['rnn.weight_hh_l0'].shape[1],
            'tokenizer': tokenizer_spec('attngan', words_num, words=words),
            'word_dim': word_dim,
            'dropout': 0.5,
        }
    )
    image = build_image_encoder(
        {
            'family': 'damsm',
            'dim': image_state['emb_cnn_code.weight'].shape[0],
            'image_size': 299,
            'backbone': 'inception_v3',
            'width': 0,
            'train_backbone': False,
            'bn_stats': 'adapt',
            'align_corners': False,  # AttnGAN code/model.py CNN_ENCODER on today's PyTorch
        }
    )
    text.load_state_dict(text_state)
    image.load_state_dict({_attngan_image_key(k): v for k, v in image_state.items()})
    return text, image


def load_encoders(
    net_e, device='cpu', attngan_words=None, words_num=ATTNGAN_WORDS_NUM, align_corners=None
):
    """AttnGAN's convention: TRAIN.NET_E = .../text_encoder<N>.pth, the image encoder beside it
    as image_encoder<N>.pth. Both rebuilt from the spec they carry, in eval mode and frozen
    (requires_grad False; gradients still flow to their inputs). A run directory stands for
    its newest text_encoder<N>.pth. AttnGAN's own released files (plain state dicts) load too,
    given the dataset's vocabulary (`attngan_words()`, called only then) and word limit
    (AttnGAN's TEXT.WORDS_NUM). `align_corners` (None: the spec's) sets a damsm-family image
    encoder's bilinear resize to its input size (CNNImageEncoder); other families keep theirs."""
    if os.path.isdir(net_e):
        net_e = newest_text_encoder(net_e)
    folder, name = os.path.split(net_e)
    if 'text_encoder' not in name:
        raise utils.UserError(
            f"{net_e}: expected a text_encoder<N>.pth written by pretrain_DAMSM.py"
        )
    paths = (net_e, os.path.join(folder, name.replace('text_encoder', 'image_encoder')))
    raw = [utils.load_weights(p) for p in paths]
    if all(utils.is_state_dict(r) for r in raw):
        if attngan_words is None:
            raise utils.UserError(
                f"{net_e}: AttnGAN's DAMSM weights carry no vocabulary; give the dataset's "
                "captions.pickle (DATA_DIR)"
            )
        modules = attngan_damsm_modules(*raw, attngan_words(), words_num, net_e)
    else:
        modules = []
        for path, kind, build in zip(
            paths, ('text_encoder', 'image_encoder'), (build_text_encoder, build_image_encoder)
        ):
            ckpt = utils.load_checkpoint(path, kind)
            module = build(ckpt['extra']['spec'])
            module.load_state_dict(ckpt['models'][kind])
            modules.append(module)
    if align_corners is not None and isinstance(modules[1], CNNImageEncoder):
        modules[1].spec = {**modules[1].spec, 'align_corners': bool(align_corners)}
    for m, path in zip(modules, paths):  # the evaluation protocol names the files it scored with
        m.weights_path = path
    return tuple(m.to(device).eval().requires_grad_(False) for m in modules)


# ---- open_clip's checkpoint layout (open_clip model.py CLIP, transformer.py, modified_resnet.py) ----
# Our 'clip' family is open_clip's CLIP with other module names; pretrain_DAMSM.py's DualEncoder
# (text., image., logit_scale) maps one to one onto open_clip's CLIP.state_dict(). Names and their
# order are those of open_clip's RN50 / ViT-B-32 (tests/data/open_clip_rn50_keys.txt).
_OC_BLOCK = [  # ResidualAttentionBlock: ours -> open_clip's (nn.MultiheadAttention, mlp c_fc/c_proj)
    (r'in_proj\.weight', 'attn.in_proj_weight'),
    (r'in_proj\.bias', 'attn.in_proj_bias'),
    (r'out_proj\.(weight|bias)', r'attn.out_proj.\1'),
    (r'mlp\.0\.(weight|bias)', r'mlp.c_fc.\1'),
    (r'mlp\.2\.(weight|bias)', r'mlp.c_proj.\1'),
    (r'(ln_[12]\.(?:weight|bias))', r'\1'),
]
_OC_STEM = {'0': 'conv1', '1': 'bn1', '3': 'conv2', '4': 'bn2', '6': 'conv3', '7': 'bn3'}
# open_clip's parameter and buffer order (its state_dict and named_parameters), as key patterns
_OC_ORDER = [
    r'positional_embedding',
    r'text_projection',
    r'logit_scale',
    r'visual\.class_embedding',
    r'visual\.positional_embedding',
    r'visual\.proj',
    r'visual\.conv1\.',
    r'visual\.ln_pre\.',
    r'visual\.bn1\.',
    r'visual\.conv2\.',
    r'visual\.bn2\.',
    r'visual\.conv3\.',
    r'visual\.bn3\.',
    r'visual\.layer(\d+)\.(\d+)\.',
    r'visual\.attnpool\.',
    r'visual\.transformer\.resblocks\.(\d+)\.',
    r'visual\.ln_post\.',
    r'transformer\.resblocks\.(\d+)\.',
    r'token_embedding\.',
    r'ln_final\.',
]
_OC_INNER = [
    r'ln_1\.',
    r'attn\.in_proj_weight',
    r'attn\.in_proj_bias',
    r'attn\.out_proj\.',
    r'ln_2\.',
    r'mlp\.c_fc\.',
    r'mlp\.c_proj\.',
    r'conv1\.',
    r'bn1\.',
    r'conv2\.',
    r'bn2\.',
    r'conv3\.',
    r'bn3\.',
    r'downsample\.0\.',
    r'downsample\.1\.',
    r'positional_embedding',
    r'k_proj\.',
    r'q_proj\.',
    r'v_proj\.',
    r'c_proj\.',
]
_OC_LEAF = ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
OPEN_CLIP_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def _oc_block(ours, prefix):
    for pattern, theirs in _OC_BLOCK:
        if re.fullmatch(pattern, ours):
            return prefix + re.sub(pattern, theirs, ours)
    return None


def open_clip_key(key):
    """pretrain_DAMSM.py DualEncoder name of the clip family -> open_clip CLIP name (None if none)."""
    if key == 'logit_scale':
        return key
    if key.startswith('text.'):
        k = key[5:]
        if k in ('token_embedding.weight', 'positional_embedding', 'text_projection'):
            return k
        if m := re.fullmatch(r'ln_final\.(weight|bias)', k):
            return k
        if m := re.fullmatch(r'blocks\.(\d+)\.(.+)', k):
            return _oc_block(m.group(2), f'transformer.resblocks.{m.group(1)}.')
        return None
    if not key.startswith('image.net.'):
        return None
    k = key[10:]
    if m := re.fullmatch(r'stem\.(\d)\.(.+)', k):  # ModifiedResNet's three-conv stem
        return f'visual.{_OC_STEM[m.group(1)]}.{m.group(2)}' if m.group(1) in _OC_STEM else None
    if m := re.fullmatch(r'stages\.(\d+)\.(\d+)\.(.+)', k):
        rest = m.group(3)
        if d := re.fullmatch(r'downsample\.([12])\.(.+)', rest):  # open_clip names the pool '-1'
            rest = f'downsample.{int(d.group(1)) - 1}.{d.group(2)}'
        elif not re.fullmatch(r'(conv[123]|bn[123])\..+', rest):
            return None
        return f'visual.layer{int(m.group(1)) + 1}.{m.group(2)}.{rest}'
    if re.fullmatch(r'attnpool\.(positional_embedding|[qkvc]_proj\.(weight|bias))', k):
        return 'visual.' + k
    if k in ('conv1.weight', 'class_embedding', 'positional_embedding', 'proj') or re.fullmatch(
        r'ln_(pre|post)\.(weight|bias)', k
    ):  # VisionTransformer
        return 'visual.' + k
    if m := re.fullmatch(r'blocks\.(\d+)\.(.+)', k):
        return _oc_block(m.group(2), f'visual.transformer.resblocks.{m.group(1)}.')
    return None


def open_clip_order(key):
    """Sort key giving open_clip's state-dict order."""
    for i, pattern in enumerate(_OC_ORDER):
        if m := re.match(pattern, key):
            rest = key[m.end() :]
            inner = next((j for j, p in enumerate(_OC_INNER) if re.match(p, rest)), -1)
            leaf = key.rsplit('.', 1)[-1]
            return (
                i,
                *map(int, m.groups()),
                inner,
                _OC_LEAF.index(leaf) if leaf in _OC_LEAF else -1,
            )
    return (len(_OC_ORDER), key)


def open_clip_names(state, where):
    """{our name: open_clip name} for every entry of a DualEncoder state dict; an entry without
    a counterpart is an error naming it."""
    out = {}
    for key in state:
        theirs = open_clip_key(key)
        if theirs is None:
            raise utils.UserError(f"{where}: {key!r} has no open_clip counterpart")
        out[key] = theirs
    return out


def to_open_clip_state_dict(state, where='model'):
    """DualEncoder state dict (clip family) -> open_clip CLIP.state_dict(), in its order."""
    names = open_clip_names(state, where)
    return {names[k]: state[k] for k in sorted(state, key=lambda k: open_clip_order(names[k]))}


def open_clip_is_excluded(name):
    """open_clip_train main.py: no weight decay (its first AdamW group) for these."""
    return any(s in name for s in ('bn', 'ln', 'bias', 'logit_scale'))


def open_clip_param_groups(oc_state):
    """open_clip's two AdamW groups over these open_clip names: (no decay, decay), in order."""
    params = [k for k in oc_state if k.rsplit('.', 1)[-1] not in OPEN_CLIP_BUFFERS]
    excluded = [k for k in params if oc_state[k].ndim < 2 or open_clip_is_excluded(k)]
    return excluded, [k for k in params if k not in set(excluded)]


def from_open_clip_state_dict(oc_state, ours, path):
    """open_clip CLIP.state_dict() (a DDP run's 'module.' prefix removed) -> the state dict of our
    DualEncoder `ours` expects: every open_clip entry must map onto one of ours with its shape,
    and every one of ours be there; else one line naming the key."""
    if oc_state and all(k.startswith('module.') for k in oc_state):
        oc_state = {k[7:]: v for k, v in oc_state.items()}
    names = open_clip_names(ours, 'the model this cfg builds')
    back = {theirs: k for k, theirs in names.items()}
    state = {}
    for key, value in oc_state.items():
        if key not in back:
            raise utils.UserError(
                f"{path}: state_dict key {key!r} maps to nothing in the model this cfg builds "
                f"(MODEL.FAMILY clip, MODEL.CLIP, LOSS.CLIP > 0 for logit_scale)"
            )
        want = ours[back[key]].shape
        if value.shape != want:
            raise utils.UserError(
                f"{path}: state_dict key {key!r} has shape {tuple(value.shape)}, the model this "
                f"cfg builds {tuple(want)} (MODEL.CLIP, TEXT.EMBEDDING_DIM, TEXT.WORDS_NUM, the "
                "tokenizer's vocabulary)"
            )
        state[back[key]] = value
    missing = [names[k] for k in ours if k not in state]
    if missing:
        raise utils.UserError(f"{path}: state_dict lacks {missing[0]!r}")
    return state


def is_open_clip_checkpoint(obj):
    """open_clip_train's epoch_N.pt ({'epoch', 'name', 'state_dict', 'optimizer'}) or a bare
    open_clip CLIP.state_dict() (what its --resume also takes)."""
    if not isinstance(obj, dict) or 'kind' in obj:
        return False
    sd = obj.get('state_dict', obj)
    return utils.is_state_dict(sd) and any(k.startswith(('visual.', 'module.visual.')) for k in sd)


def to_open_clip_checkpoint(model, opt, epoch, name, scaler=None, ddp=False):
    """open_clip_train main.py's epoch_N.pt of a DualEncoder (clip family) and its optimizer:
    {'epoch', 'name', 'state_dict' (open_clip names and order, 'module.' as its DDP runs write
    it), 'optimizer' (AdamW's two groups: no decay for gains, biases, logit_scale, then the
    rest, each parameter's state moved to its open_clip index), 'scaler' when one is on}."""
    state = model.state_dict()
    oc = to_open_clip_state_dict(state)
    back = {v: k for k, v in open_clip_names(state, 'model').items()}
    by_id = {id(p): n for n, p in model.named_parameters()}
    ours = {by_id[id(p)]: (opt.state.get(p, {}), g) for g in opt.param_groups for p in g['params']}
    template = torch.optim.AdamW([torch.zeros(1)]).state_dict()['param_groups'][0]
    out, groups, idx = {}, [], 0
    for members, decay in zip(open_clip_param_groups(oc), (False, True)):
        ids = []
        for theirs in members:
            if back[theirs] not in ours:
                raise utils.UserError(f"{back[theirs]}: not in the optimizer; open_clip trains all")
            st, g = ours[back[theirs]]
            if st:
                out[idx] = dict(st)
            ids.append(idx)
            idx += 1
        g = ours[back[members[0]]][1] if members else opt.param_groups[0]
        groups.append(
            {
                **template,
                'lr': g['lr'],
                'betas': tuple(g['betas']),
                'eps': g['eps'],
                'weight_decay': g['weight_decay'] if decay else 0.0,
                'params': ids,
            }
        )
    ckpt = {
        'epoch': int(epoch),
        'name': name,
        'state_dict': {('module.' if ddp else '') + k: v for k, v in oc.items()},
        'optimizer': {'state': out, 'param_groups': groups},
    }
    if scaler is not None and scaler.is_enabled():
        ckpt['scaler'] = scaler.state_dict()
    return ckpt


def open_clip_optimizer_state(saved, model, opt, path):
    """open_clip's AdamW state (its two groups over its parameter order) -> `opt`'s state dict:
    each parameter's moments moved to its place in opt, opt's own groups kept (lr, weight decay
    come from the cfg, as a resumed open_clip run takes them from its flags)."""
    oc_groups = open_clip_param_groups(to_open_clip_state_dict(model.state_dict()))
    groups = saved.get('param_groups', [])
    if [len(g['params']) for g in groups] != [len(m) for m in oc_groups]:
        raise utils.UserError(
            f"{path}: optimizer groups of {[len(g['params']) for g in groups]} parameters; "
            f"open_clip's AdamW over this model has {[len(m) for m in oc_groups]}"
        )
    back = {v: k for k, v in open_clip_names(model.state_dict(), 'model').items()}
    params = dict(model.named_parameters())
    order = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g['params'])}
    state = {}
    for g, members in zip(groups, oc_groups):
        for i, theirs in zip(g['params'], members):
            if i in saved['state']:
                state[order[id(params[back[theirs]])]] = saved['state'][i]
    return {'state': state, 'param_groups': opt.state_dict()['param_groups']}


@torch.no_grad()
def encode_text(text_encoder, texts, device):
    """Frozen text features: words (B, D, T), sentence (B, D), padding mask (B, T)."""
    words, sent, pad = text_encoder.encode(list(texts))
    return words.to(device).float(), sent.to(device).float(), pad.to(device)


class TextFeatureCache:
    """encode_text for a fixed set of captions, each encoded once. A batch's words are cut to
    its longest caption; the positions dropped are padding, which every reader of the words
    masks out, so the features a generator or loss sees are those of encode_text."""

    def __init__(self, text_encoder, texts, device, chunk=1024):
        self.index = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        unique = list(self.index)
        words, sents, counts = [], [], []
        with torch.no_grad():
            for i in range(0, len(unique), chunk):
                w, s, pad = encode_text(text_encoder, unique[i : i + chunk], device)
                words.append(w)
                sents.append(s)
                counts.append((~pad).sum(1))
        width = max(w.shape[2] for w in words)
        self.words = torch.cat([F.pad(w, (0, width - w.shape[2])) for w in words])
        self.sent, self.n_words = torch.cat(sents), torch.cat(counts)

    def __call__(self, texts):
        rows = torch.tensor([self.index[t] for t in texts], device=self.sent.device)
        n_words = self.n_words[rows]
        width = int(n_words.max())
        pad = torch.arange(width, device=rows.device)[None] >= n_words[:, None]
        return self.words[rows, :, :width], self.sent[rows], pad


# ---- losses -----------------------------------------------------------------------------------
def _cosine(a, b, dim, eps=1e-8):
    """AttnGAN's cosine_similarity: a·b / max(|a||b|, eps)."""
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp(min=eps)


def info_nce(logits):
    """InfoNCE (Oord et al. 2018, Eq. 4) over a batch's pairwise logits whose diagonal holds the
    matching pairs: cross-entropy of each row against its diagonal entry (a -> b) and of each
    column (b -> a). DAMSM's matching losses, CLIP's and XMC-GAN's contrastive losses are this
    on their own logits."""
    labels = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, labels), F.cross_entropy(logits.t(), labels)


def _match_losses(scores, class_ids):
    """Cross-entropy of the matching score matrix (rows images, columns captions) in both
    directions; pairs of the same class other than the true one masked out (AttnGAN)."""
    if class_ids is not None:
        same = class_ids[:, None] == class_ids[None, :]
        same.fill_diagonal_(False)
        scores = scores.masked_fill(same, float('-inf'))
    return info_nce(scores)


WORD_LOSS_FORMS = ('attngan', 't2i_clip_gan')


def _l2norm(x, dim):
    """T2I_CLIP-GAN's l2norm: x / (|x| + 1e-8)."""
    return x / (x.norm(dim=dim, keepdim=True) + 1e-8)


def gram_pays(regions, dims):
    """Whether |c|^2 = alpha^T G alpha (R x R per word) costs less than building c (R x D) and
    taking its norm; a 2x margin, as the Gram path adds a product and a Gram matrix of its own."""
    return 2 * regions <= dims


def _context_norm(alpha, gram, contexts):
    """|c| of the attention contexts c_k = sum_r alpha_kr v_r, alpha (I, J, T, R): I the captions,
    J the images whose regions v attend. Where gram_pays, from the images' Gram matrices gram
    (J, R, R) = V^T V as |c|^2 = alpha^T G alpha, so the contexts (I x J x T x D) are never built;
    otherwise from contexts(alpha) itself, (I, J, T, D)."""
    if gram is None:
        return contexts(alpha).norm(dim=3)
    # the clamp keeps sqrt's gradient finite where a context is zero
    return (torch.einsum('ijtr,jrq->ijtq', alpha, gram) * alpha).sum(3).clamp(min=1e-16).sqrt()


def _float32(*tensors):
    """For sums that bf16 rounds too coarsely (the word losses: ~1e-2 of the scaled loss; VQ's
    nearest codes): the tensors cast up to float32 (float64 kept), and the context that turns
    autocast off on their device."""
    cast = [t if t.dtype == torch.float64 else t.float() for t in tensors]
    return cast, torch.autocast(tensors[0].device.type, enabled=False)


def words_loss(
    regions, words, pad_mask, class_ids=None, gamma1=4.0, gamma2=5.0, gamma3=10.0, form='attngan'
):
    """DAMSM word loss (AttnGAN Eq. 7-13; miscc/losses.words_loss, GlobalAttention.func_attention).
    regions (B, D, h, w) = v, words (B, D, T) = e, pad_mask (B, T) True at padding.
    For caption i and image j: s = e^T v normalised over the words for each region (Eq. 7-8;
    padding masked out); α = softmax over the regions of γ1·s (Eq. 9); region context
    c_k = Σ_r α_kr v_r; R(Q_j, D_i) = log Σ_k exp(γ2·cos(c_k, e_k)) over the caption's words
    (Eq. 10); P(D_i|Q_i) = softmax over the batch of γ3·R (Eq. 11); loss0 = -mean log P(D_i|Q_i),
    loss1 = -mean log P(Q_i|D_i) (Eq. 12-13).
    form 'attngan' is AttnGAN's code: raw e^T v, and Eq. 10 without the paper's 1/γ2 power.
    form 't2i_clip_gan' is T2I_CLIP-GAN's (DMGAN+CLIP/code/miscc/losses.similarity_text_image):
    e and v L2-normalised first (s is a cosine, c is built from unit regions) and Eq. 10 with the
    power, R = (1/γ2) log Σ_k exp(γ2·cos(c_k, e_k)).
    All caption-image pairs at once, in chunks of captions to bound memory.
    Returns loss0, loss1 and each caption's attention map on its own image (T, h, w)."""
    if form not in WORD_LOSS_FORMS:
        raise ValueError(f"word loss form {form!r}: expected one of {WORD_LOSS_FORMS}")
    (regions, words), fp32 = _float32(regions, words)
    with fp32:
        B, D, T = words.shape
        h, w = regions.shape[2:]
        R = h * w
        ctx = regions.reshape(B, D, R)
        if form == 't2i_clip_gan':
            ctx, words = _l2norm(ctx, 1), _l2norm(words, 1)
        gram = ctx.transpose(1, 2) @ ctx if gram_pays(R, D) else None  # (B, R, R), _context_norm
        chunk = max(1, (1 << 22) // (B * T * max(R, D)))
        sims, maps = [], []
        for c0 in range(0, B, chunk):
            e, pad = words[c0 : c0 + chunk], pad_mask[c0 : c0 + chunk]  # (C, D, T), (C, T)
            s = torch.einsum('jdr,idt->ijtr', ctx, e)  # (C, B, T, R): e_k . v_r
            alpha = (
                s.masked_fill(pad[:, None, :, None], float('-inf')).softmax(dim=2) * gamma1
            ).softmax(dim=3)
            dot = (alpha * s).sum(3)  # c_k . e_k
            norm = _context_norm(alpha, gram, lambda a: torch.einsum('jdr,ijtr->ijtd', ctx, a))
            cos = dot / (norm * e.norm(dim=1)[:, None]).clamp(min=1e-8)
            sims.append(
                torch.logsumexp((gamma2 * cos).masked_fill(pad[:, None], float('-inf')), dim=2)
            )
            maps += [alpha[k, c0 + k].reshape(T, h, w) for k in range(len(e))]
    sim = torch.cat(sims).t()  # rows images
    if form == 't2i_clip_gan':
        sim = sim / gamma2
    loss0, loss1 = _match_losses(sim * gamma3, class_ids)
    return loss0, loss1, maps


def sent_loss(img_code, sent_code, class_ids=None, gamma3=10.0):
    """DAMSM sentence loss (AttnGAN Eq. 10-13 on the global vectors): R(Q, D) = cos(q, e),
    ×γ3, cross-entropy in both directions with the same class masking (miscc/losses.sent_loss)."""
    return _match_losses(_cosine(img_code[:, None], sent_code[None], dim=2) * gamma3, class_ids)


def clip_loss(img, txt, logit_scale):
    """CLIP's contrastive loss (Radford et al. 2021, Fig. 3): logits = exp(t)·cos(I, T),
    symmetric cross-entropy, (L_image + L_text) / 2."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    loss_image, loss_text = info_nce(logit_scale.exp() * img @ txt.t())
    return (loss_image + loss_text) / 2


def nt_xent_loss(z1, z2, tau=0.5):
    """SimCLR's NT-Xent (Chen et al. 2020, Eq. 1): each of the 2N views against the other
    2N-1, its positive being the other view of the same item; mean over the 2N terms
    (T2I_CL's nt_xent.py, used by T2I_CLIP-GAN on two captions of one image, τ = 0.5)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.t() / tau).masked_fill(
        torch.eye(len(z), dtype=torch.bool, device=z.device), float('-inf')
    )
    n = len(z1)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, targets)


GAN_LOSSES = ('bce', 'hinge')


def _bce(logits, target):
    # BCE on logits == DM-GAN's sigmoid + BCELoss (code/miscc/losses.py), without its saturation.
    return F.binary_cross_entropy_with_logits(
        logits.float(), torch.full_like(logits.float(), target)
    )


def gan_d_term(logits, real, form):
    """One discriminator term on D's logits. 'hinge' (Lim & Ye 2017, Geometric GAN; SNGAN,
    Miyato et al. 2018; XMC-GAN Sec. 3.2): E[relu(1 - D)] on real pairs, E[relu(1 + D)] on fake
    and mismatched ones. 'bce': DM-GAN's BCE towards 1 on real, 0 otherwise."""
    if form == 'hinge':
        return F.relu(1 - logits.float()).mean() if real else F.relu(1 + logits.float()).mean()
    return _bce(logits, 1.0 if real else 0.0)


def gan_g_term(logits, form):
    """The generator's "fool D" term on D's logits of fakes: the hinge form's -E[D] (SNGAN;
    XMC-GAN Sec. 3.2), or DM-GAN's BCE towards real."""
    return -logits.float().mean() if form == 'hinge' else _bce(logits, 1.0)


# ============================================================================
# DM-GAN (Zhu et al. 2019), conditioned on DAMSM or CLIP text features
# ============================================================================
# [section: dmgan]
# Layer widths follow DM-GAN's code (MinfengZhu/DM-GAN, code/model.py); with its
# bird/coco cfgs the parameter counts equal the original's (tests/test_dmgan.py).
class GLU(nn.Module):
    """Gated linear unit over channels: first half * sigmoid(second half)."""

    def forward(self, x):
        return F.glu(x, dim=1)


def conv3x3(cin, cout, bias=False):
    return nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)


def up_block(cin, cout):
    """Nearest 2x upsampling, 3x3 conv, BN, GLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode='nearest'),
        conv3x3(cin, cout * 2),
        nn.BatchNorm2d(cout * 2),
        GLU(),
    )


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(
            conv3x3(c, c * 2), nn.BatchNorm2d(c * 2), GLU(), conv3x3(c, c), nn.BatchNorm2d(c)
        )

    def forward(self, x):
        return x + self.block(x)


class CANet(nn.Module):
    """Conditioning augmentation (StackGAN): c ~ N(mu(s), diag(exp(logvar(s))))."""

    def __init__(self, text_dim, cond_dim):
        super().__init__()
        self.cond_dim = cond_dim
        self.fc = nn.Linear(text_dim, cond_dim * 4)
        self.glu = GLU()

    def forward(self, sent_emb):
        x = self.glu(self.fc(sent_emb))
        mu, logvar = x[:, : self.cond_dim], x[:, self.cond_dim :]
        c = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return c, mu, logvar


class InitStageG(nn.Module):
    """Initial stage: [c, z] -> 4x4 x ngf -> up-blocks halving channels -> base_size
    (64 in DM-GAN: four up-blocks to 64x64 x ngf/16)."""

    def __init__(self, ngf, in_dim, n_up=4):
        super().__init__()
        self.ngf = ngf
        self.fc = nn.Sequential(
            nn.Linear(in_dim, ngf * 4 * 4 * 2, bias=False), nn.BatchNorm1d(ngf * 4 * 4 * 2), GLU()
        )
        self.upsample = nn.Sequential(
            *[up_block(ngf // 2**i, ngf // 2 ** (i + 1)) for i in range(n_up)]
        )

    def forward(self, z, c):
        return self.upsample(self.fc(torch.cat([c, z], 1)).view(-1, self.ngf, 4, 4))


class DynamicMemory(nn.Module):
    """DM-GAN's memory refinement (Sec. 3.2): memory writing gated by the image
    (Eq. 3-4), key addressing and value reading (Eq. 5-7), response gate (Eq. 8-9)."""

    def __init__(self, ngf, nef):
        super().__init__()
        self.A = nn.Linear(nef, 1, bias=False)  # word part of the writing gate
        self.B = nn.Linear(ngf, 1, bias=False)  # image part of the writing gate
        self.M_r = nn.Sequential(nn.Conv1d(ngf, ngf * 2, 1), nn.ReLU())
        self.M_w = nn.Sequential(nn.Conv1d(nef, ngf * 2, 1), nn.ReLU())
        self.key = nn.Sequential(nn.Conv1d(ngf * 2, ngf, 1), nn.ReLU())
        self.value = nn.Sequential(nn.Conv1d(ngf * 2, ngf, 1), nn.ReLU())
        self.response_gate = nn.Sequential(nn.Conv2d(ngf * 2, 1, 1), nn.Sigmoid())

    def forward(self, h, words, pad_mask):
        """h: (B, ngf, H, W) image features; words: (B, nef, T); pad_mask: (B, T) True=pad."""
        B, C, H, W = h.shape
        T = words.shape[2]
        h_avg = h.mean((2, 3)).detach()  # (B, ngf)
        gate = torch.sigmoid(self.A(words.transpose(1, 2)) + self.B(h_avg)[:, None])  # (B, T, 1)
        gate = gate.transpose(1, 2)  # (B, 1, T)
        memory = self.M_w(words) * gate + self.M_r(h_avg[:, :, None].expand(B, C, T)) * (1 - gate)
        key, value = self.key(memory), self.value(memory)  # (B, ngf, T)
        query = h.flatten(2).transpose(1, 2)  # (B, HW, ngf)
        logits = torch.bmm(query, key)  # (B, HW, T)
        if pad_mask is not None:
            # Per-sample mask. (The original repeated the mask along the wrong
            # axis, so with batch > 1 each sample got another sample's padding.)
            logits = logits.masked_fill(pad_mask[:, None, :], float('-inf'))
        att = torch.softmax(logits, dim=2)
        read = torch.bmm(value, att.transpose(1, 2)).view(B, C, H, W)
        r = self.response_gate(torch.cat([h, read], 1))
        return h * (1 - r) + read * r, att.transpose(1, 2).reshape(B, T, H, W)


class NextStageG(nn.Module):
    """Refinement stage: dynamic memory, residual blocks, 2x up-block."""

    def __init__(self, ngf, nef, r_num):
        super().__init__()
        self.memory = DynamicMemory(ngf, nef)
        self.residual = nn.Sequential(*[ResBlock(ngf * 2) for _ in range(r_num)])
        self.upsample = up_block(ngf * 2, ngf)

    def forward(self, h, words, pad_mask):
        h, att = self.memory(h, words, pad_mask)
        return self.upsample(self.residual(torch.cat([h, h], 1))), att


class DMGANGenerator(nn.Module):
    """G_NET: CA, initial 64x64 stage, then branch_num - 1 memory stages (128, 256).
    base_size 32 or 16 (embedded cfgs only) starts with three or two up-blocks instead of four."""

    def __init__(
        self, gf_dim=64, z_dim=100, cond_dim=100, text_dim=256, branch_num=3, r_num=2, base_size=64
    ):
        super().__init__()
        self.z_dim = z_dim
        n_up = int(math.log2(base_size // 4))
        self.ca_net = CANet(text_dim, cond_dim)
        self.init_stage = InitStageG(gf_dim * 2**n_up, z_dim + cond_dim, n_up)
        self.stages = nn.ModuleList(
            [NextStageG(gf_dim, text_dim, r_num) for _ in range(branch_num - 1)]
        )
        self.img_heads = nn.ModuleList(
            [nn.Sequential(conv3x3(gf_dim, 3), nn.Tanh()) for _ in range(branch_num)]
        )

    def forward(self, z, sent_emb, words_emb, pad_mask):
        """Returns images per stage (in [-1, 1]), attention maps per memory stage, mu, logvar."""
        c, mu, logvar = self.ca_net(sent_emb)
        h = self.init_stage(z, c)
        imgs, atts = [self.img_heads[0](h)], []
        for stage, head in zip(self.stages, self.img_heads[1:]):
            h, att = stage(h, words_emb, pad_mask)
            imgs.append(head(h))
            atts.append(att)
        return imgs, atts, mu, logvar


class SpectralNorm(nn.Module):
    """Spectral normalisation by one power iteration per forward, as DM-GAN's
    spectral.py: the raw weight and the u/v vectors are parameters of the wrapper
    (u, v without gradient), which is what the original's parameter count includes.
    The original iterates in eval mode too (its forward never reads self.training);
    eval_power_iteration=False freezes u/v in eval mode instead."""

    def __init__(self, module, eval_power_iteration=True):
        super().__init__()
        self.module = module
        self.eval_power_iteration = eval_power_iteration
        w = module.weight.detach()
        del module._parameters['weight']
        height = w.shape[0]
        self.weight_bar = nn.Parameter(w)
        self.weight_u = nn.Parameter(
            F.normalize(torch.randn(height), dim=0, eps=1e-12), requires_grad=False
        )
        self.weight_v = nn.Parameter(
            F.normalize(torch.randn(w[0].numel()), dim=0, eps=1e-12), requires_grad=False
        )

    def forward(self, x):
        w = self.weight_bar.reshape(self.weight_bar.shape[0], -1)
        if self.training or self.eval_power_iteration:
            with torch.no_grad():
                v = F.normalize(w.t() @ self.weight_u, dim=0, eps=1e-12)
                self.weight_v.copy_(v)
                self.weight_u.copy_(F.normalize(w @ v, dim=0, eps=1e-12))
        # Clones: D runs on real and fake before one backward, and the next forward's
        # in-place power iteration must not change what this one's graph saved.
        sigma = self.weight_u.clone() @ (w @ self.weight_v.clone())
        self.module.weight = self.weight_bar / sigma
        return self.module(x)


def sn_conv(cin, cout, k, s, p, eval_power_iteration=True):
    return SpectralNorm(nn.Conv2d(cin, cout, k, s, p, bias=True), eval_power_iteration)


class DGetLogits(nn.Module):
    """Unconditional logit from the 4x4 code, or conditional on the sentence code."""

    def __init__(self, ndf, nef, condition, sn_eval_power_iteration=True):
        super().__init__()
        self.nef = nef
        self.joint = (
            nn.Sequential(
                sn_conv(ndf * 8 + nef, ndf * 8, 3, 1, 1, sn_eval_power_iteration),
                nn.LeakyReLU(0.2),
            )
            if condition
            else None
        )
        self.outlogits = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4)

    def forward(self, h, c=None):
        if self.joint is not None:
            h = self.joint(torch.cat([h, c.view(-1, self.nef, 1, 1).expand(-1, -1, 4, 4)], 1))
        return self.outlogits(h).view(-1)  # logits; BCE-with-logits replaces sigmoid + BCE


class ProjectionLogits(nn.Module):
    """Conditional logit of a projection discriminator (Miyato & Koyama 2018, Eq. 3):
    psi(phi(x)) + (V s)^T phi(x), with V a spectrally normalised linear map of the sentence
    code. phi is the whole 4x4 code, not its sum over positions (the paper's choice for
    ImageNet classes), so a caption's place enters the inner product as well as its shape."""

    def __init__(self, ndf, nef, sn_eval_power_iteration=True):
        super().__init__()
        self.outlogits = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4)
        self.embed = SpectralNorm(
            nn.Linear(nef, ndf * 8 * 4 * 4, bias=False), sn_eval_power_iteration
        )

    def forward(self, h, c):
        return self.outlogits(h).view(-1) + (self.embed(c) * h.flatten(1)).sum(1)

    def pair_scores(self, h, c):
        """(B, B): the conditional part (V s_j)^T phi(x_i) of image i's logit with caption j."""
        return h.flatten(1) @ self.embed(c).t()


def sentence_contrastive_loss(cond, h, sent):
    """XMC-GAN's image-sentence contrastive loss (Zhang et al. 2021, Eq. 2 and 6) scored by a
    projection discriminator's conditional logit: each image against every caption of the batch,
    its own caption the positive. DM-GAN's mismatched pair (real i, caption i+1) is one such
    negative; here all B - 1 are."""
    if not isinstance(cond, ProjectionLogits):
        raise utils.UserError(
            "TRAIN.SENTENCE_CONTRASTIVE needs GAN.D_CONDITION projection (its pair scores)"
        )
    scores = cond.pair_scores(h, sent).float()
    return F.cross_entropy(scores, torch.arange(len(scores), device=scores.device))


def word_region_contrastive_loss(netD, h, words, pad_mask, gamma1=5.0, gamma2=5.0, gamma3=50.0):
    """XMC-GAN's word-region contrastive loss (Zhang et al. 2021, Eq. 3-5) on a DM-GAN
    discriminator's 4x4 code: each cell, mapped to the word space by D's word_regions, is a
    region; every image of the batch against every caption (word_contrastive_loss).
    h (B, 8ndf, 4, 4), words (B, D, T), pad_mask (B, T) True at padding."""
    if netD.word_regions is None:
        raise utils.UserError('TRAIN.WORD_CONTRASTIVE.WEIGHT > 0 needs D built with word_regions')
    regions = netD.word_regions(h).flatten(2).transpose(1, 2)
    return word_contrastive_loss(regions, words.transpose(1, 2), pad_mask, gamma1, gamma2, gamma3)


D_CONDITIONS = ('concat', 'projection')


class DMGANDiscriminator(nn.Module):
    """D_NET64 / D_NET128 / D_NET256: down-sampling to a 4x4 x 8ndf code, then
    unconditional and sentence-conditional logits. sn_eval_power_iteration: SpectralNorm's.
    condition: concat (DM-GAN's D_GET_LOGITS, the sentence code tiled beside the image code)
    or projection (ProjectionLogits)."""

    def __init__(
        self,
        img_size,
        df_dim=64,
        text_dim=256,
        sn_eval_power_iteration=True,
        condition='concat',
        word_regions=False,
    ):
        super().__init__()
        if condition not in D_CONDITIONS:
            raise utils.UserError(
                f"GAN.D_CONDITION={condition!r}: expected one of {', '.join(D_CONDITIONS)}"
            )
        it = sn_eval_power_iteration
        ndf, lrelu = df_dim, (lambda: nn.LeakyReLU(0.2))
        trunk = [3, ndf, ndf * 2, ndf * 4, ndf * 8]  # 64 -> 4 in four 4x4/2 convs
        if img_size < 64:  # embedded 32 / 16 px stages: the last three / two
            trunk = [3] + trunk[-int(math.log2(img_size // 4)) :]
        layers = []
        for cin, cout in zip(trunk[:-1], trunk[1:]):
            layers += [sn_conv(cin, cout, 4, 2, 1, it), lrelu()]
        extra = int(math.log2(max(img_size, 64) // 64))  # 0 / 1 / 2 more down-blocks
        c = ndf * 8
        for _ in range(extra):
            layers += [sn_conv(c, c * 2, 4, 2, 1, it), lrelu()]
            c *= 2
        for _ in range(extra):  # 3x3 blocks back to 8 ndf
            layers += [sn_conv(c, c // 2, 3, 1, 1, it), lrelu()]
            c //= 2
        self.img_code = nn.Sequential(*layers)
        self.uncond = DGetLogits(ndf, text_dim, condition=False)
        self.cond = (
            DGetLogits(ndf, text_dim, condition=True, sn_eval_power_iteration=it)
            if condition == 'concat'
            else ProjectionLogits(ndf, text_dim, it)
        )
        # the 4x4 code's cells as regions in the word space, for word_region_contrastive_loss
        self.word_regions = sn_conv(ndf * 8, text_dim, 1, 1, 0, it) if word_regions else None

    def forward(self, x):
        return self.img_code(x)


# ---- released checkpoints of the original code (torch.save(net.state_dict())) -----------------
# G_NET prefix -> DMGANGenerator prefix, first match wins: h_net1 is the initial stage
# (upsample1..4), h_net2/3 the memory stages (memory, residual and upsample parts), img_netK
# the image heads; ca_net keeps its name.
_DMGAN_G_RENAMES = (
    (r'h_net1\.upsample(\d)\.', lambda m: f'init_stage.upsample.{int(m[1]) - 1}.'),
    (r'h_net1\.fc\.', lambda m: 'init_stage.fc.'),
    (r'h_net(\d)\.(residual|upsample)\.', lambda m: f'stages.{int(m[1]) - 2}.{m[2]}.'),
    (r'h_net(\d)\.', lambda m: f'stages.{int(m[1]) - 2}.memory.'),
    (r'img_net(\d)\.img\.', lambda m: f'img_heads.{int(m[1]) - 1}.'),
)


def _dmgan_g_key(key):
    for pattern, ours in _DMGAN_G_RENAMES:
        m = re.match(pattern, key)
        if m:
            return ours(m) + key[m.end() :]
    return key


# Sequential index of each original block's conv (D_NET128 has s32, s32_1; D_NET256 s32, s64, s64_1, s64_2).
_DMGAN_D_TRUNK = {
    's16': [0, 2, 4, 6],
    's32': [8],
    's32_1': [10],
    's64': [10],
    's64_1': [12],
    's64_2': [14],
}


def _dmgan_d_key(key):
    """D_NET64/128/256 name -> DMGANDiscriminator name. The original's img_code_s16 / s32 /
    s64(_1, _2) blocks are one Sequential here (convs at even indices); its SpectralNorm keeps
    weight_bar/u/v on the wrapped conv (`.module.weight_bar`), ours on the wrapper."""
    key = re.sub(r'\.module\.(weight_bar|weight_u|weight_v)$', r'.\1', key)
    m = re.fullmatch(r'img_code_(s\d+(?:_\d)?)\.(\d+)\.(.*)', key)
    if m:
        block, idx = m[1], int(m[2])
        return f'img_code.{_DMGAN_D_TRUNK[block][idx // 2 if block == "s16" else 0]}.{m[3]}'
    key = re.sub(r'^UNCOND_DNET\.outlogits\.0\.', 'uncond.outlogits.', key)
    key = re.sub(r'^COND_DNET\.outlogits\.0\.', 'cond.outlogits.', key)
    return re.sub(r'^COND_DNET\.jointConv\.', 'cond.joint.', key)


def is_original_dmgan(state):
    """True for a state dict written by the original DM-GAN code (G_NET or D_NET*)."""
    return any(k.startswith(('h_net1.', 'img_code_s16.')) for k in state)


def convert_dmgan_state_dict(state):
    """A released G_NET (bird_DMGAN.pth, netG_epoch_N.pth) or D_NET (netD0/1/2.pth) state dict
    of MinfengZhu/DM-GAN code/model.py -> the state dict of DMGANGenerator / DMGANDiscriminator
    (load it with strict=True: every name and shape must match)."""
    rename = _dmgan_d_key if any(k.startswith('img_code_s16.') for k in state) else _dmgan_g_key
    return {rename(k): v for k, v in state.items()}


# ---- from a DM-GAN cfg: encoders, generator (main.py; XMC-GAN's sample grids show DM-GAN's too) ----
def load_dmgan_encoders(cfg, device):
    """The frozen text and image encoders of a DM-GAN cfg (TRAIN.NET_E; AttnGAN's released
    files also take the DATA_DIR vocabulary and TEXT.WORDS_NUM)."""
    if not cfg.TRAIN.NET_E:
        raise utils.UserError(
            "TRAIN.NET_E: empty; point it at a text_encoder<N>.pth written by "
            "pretrain_DAMSM.py (the image encoder is read from beside it)"
        )

    def vocabulary():  # AttnGAN's released encoders: the dataset's captions.pickle
        data = utils.AttnGANData(cfg.DATA_DIR, cfg.TEXT.CAPTIONS_PER_IMAGE)
        return [data.ixtoword[i] for i in range(len(data.ixtoword))]

    words_num = cfg.TEXT.get('WORDS_NUM', ATTNGAN_WORDS_NUM)  # cfgs of older checkpoints lack it
    # main.py's TRAIN.NET_E_ALIGN_CORNERS; the cfgs of older checkpoints lack it and ran with False
    align = cfg.TRAIN.get('NET_E_ALIGN_CORNERS', False)
    text_enc, image_enc = load_encoders(cfg.TRAIN.NET_E, device, vocabulary, words_num, align)
    for m in (text_enc, image_enc):
        m.eval().requires_grad_(False)
    if text_enc.spec['dim'] != cfg.TEXT.EMBEDDING_DIM:
        raise utils.UserError(
            f"TEXT.EMBEDDING_DIM={cfg.TEXT.EMBEDDING_DIM} but {cfg.TRAIN.NET_E} "
            f"gives {text_enc.spec['dim']}-d features; set it to {text_enc.spec['dim']}"
        )
    return text_enc, image_enc


def init_weights(module):
    """DM-GAN's weights_init (code/miscc/utils.py): orthogonal conv/linear, BN gamma ~
    N(1, 0.02)."""
    if isinstance(module, SpectralNorm):
        nn.init.orthogonal_(module.weight_bar.data)
    elif isinstance(module, (nn.Conv2d, nn.Linear)) and 'weight' in module._parameters:
        nn.init.orthogonal_(module.weight.data)
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        module.weight.data.normal_(1.0, 0.02)
        module.bias.data.zero_()


def build_dmgan_generator(cfg, text_dim):
    if cfg.TREE.BASE_SIZE not in (16, 32, 64):
        raise utils.UserError(
            f"TREE.BASE_SIZE={cfg.TREE.BASE_SIZE}: expected 64 (DM-GAN), or 16/32 (embedded cfgs)"
        )
    return DMGANGenerator(
        cfg.GAN.GF_DIM,
        cfg.GAN.Z_DIM,
        cfg.GAN.CONDITION_DIM,
        text_dim,
        cfg.TREE.BRANCH_NUM,
        cfg.GAN.R_NUM,
        cfg.TREE.BASE_SIZE,
    )


def build_dmgan_discriminators(cfg, text_dim):
    """One discriminator per stage of cfg.TREE, as cfg.GAN and the word-region term ask."""
    return [
        DMGANDiscriminator(
            cfg.TREE.BASE_SIZE * 2**i,
            cfg.GAN.DF_DIM,
            text_dim,
            cfg.GAN.SN_EVAL_POWER_ITERATION,
            cfg.GAN.D_CONDITION,
            word_regions=cfg.TRAIN.WORD_CONTRASTIVE.WEIGHT > 0,
        )
        for i in range(cfg.TREE.BRANCH_NUM)
    ]


def dmgan_generator_state(path, dev):
    """The averaged generator of one of our checkpoints (G_ema, as DM-GAN saves it), or a G_NET
    state dict released by the original code (bird_DMGAN.pth, netG_epoch_N.pth), renamed."""
    raw = utils.load_weights(path, dev)
    if utils.is_state_dict(raw):
        if not is_original_dmgan(raw):
            raise utils.UserError(
                f"{path}: a state dict, but not of DM-GAN's G_NET (no h_net1.* weights)"
            )
        return convert_dmgan_state_dict(raw)
    return utils.checkpoint_of_kind(raw, path, 'dmgan')['models']['G_ema']


def dmgan_generator_path(net_g):
    """TRAIN.NET_G as a file: itself, or its run dir's newest checkpoint."""
    if not net_g:
        raise utils.UserError("TRAIN.NET_G: empty; point it at a dmgan checkpoint (or its run dir)")
    if not os.path.isdir(net_g):
        return net_g
    found = utils.list_checkpoints(net_g, 'dmgan')
    if not found:
        raise utils.UserError(f"TRAIN.NET_G={net_g}: no dmgan_<step>.pt under {net_g}/checkpoints")
    return found[-1]


# the cfg keys that shape DM-GAN's generator (build_dmgan_generator)
DMGAN_G_KEYS = (
    ('TREE', 'BASE_SIZE'),
    ('TREE', 'BRANCH_NUM'),
    ('GAN', 'GF_DIM'),
    ('GAN', 'Z_DIM'),
    ('GAN', 'CONDITION_DIM'),
    ('GAN', 'R_NUM'),
)


def adopt_generator_cfg(cfg, log):
    """An evaluation of one of our checkpoints builds the generator it trained: its TREE / GAN
    keys (saved with it) replace the evaluation cfg's, each change logged. A released G_NET
    carries no cfg and keeps the evaluation cfg's. Returns whether a key changed."""
    path = dmgan_generator_path(cfg.TRAIN.NET_G)
    raw = utils.load_weights(path, 'cpu')
    if utils.is_state_dict(raw):
        return False
    trained = utils.checkpoint_of_kind(raw, path, 'dmgan').get('cfg') or {}
    changed = False
    for section, key in DMGAN_G_KEYS:
        value = trained.get(section, {}).get(key)
        if value is not None and value != cfg[section][key]:
            log.info(
                f"{section}.{key}: {value} as {path} was trained (the cfg says {cfg[section][key]})"
            )
            cfg[section][key], changed = value, True
    return changed


def load_dmgan_generator(cfg, text_dim, dev):
    """The generator of TRAIN.NET_G (a checkpoint, its run dir's newest, or a released G_NET), in eval mode."""
    path = dmgan_generator_path(cfg.TRAIN.NET_G)
    netG = build_dmgan_generator(cfg, text_dim).to(dev)
    try:
        netG.load_state_dict(dmgan_generator_state(path, dev))
    except RuntimeError as e:
        raise utils.UserError(
            f"{path}: generator does not match the cfg's GAN/TREE keys "
            f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})"
        )
    netG.weights_path = path
    return netG.eval()


# ---- training: the generator's moving average (XMC-GAN's too) ----------------------------------
def ema_update(ema, model, decay):
    """avg = decay * avg + (1 - decay) * p after every G step; BN statistics copied."""
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p.detach(), 1 - decay)
        for be, b in zip(ema.buffers(), model.buffers()):
            be.copy_(b)


# ============================================================================
# XMC-GAN (Zhang et al. 2021)
# ============================================================================
# [section: xmcgan]
# Structure from the original Flax code (xmcgan/nets/xmc_net.py, nets/common.py,
# libml/layers.py); images in [-1, 1] here (the original's G ends with (x+1)/2).
# 64 and 32 are ours, for the embedded CPU runs (the original has 128 and 256 only): the 128
# tables with one or two resolution levels fewer; G's attention stays at 16x16, D's regions
# are at 16x16 (64) or 8x8 (32: GAN.COND_SIZE 8).
XMC_G_CHANNELS = {32: [8, 4, 2], 64: [8, 4, 2, 1], 128: [16, 8, 4, 2, 1], 256: [16, 8, 8, 4, 2, 1]}
XMC_D_CHANNELS = {
    32: ([2, 4, 8], [True, True, False]),
    64: ([2, 4, 8, 8], [True, True, True, False]),
    128: ([2, 4, 8, 16, 16], [True, True, True, True, False]),
    256: ([2, 4, 8, 8, 16, 16], [True, True, True, True, True, False]),
}


def l2n(x, dim=-1):
    return F.normalize(x, dim=dim, eps=1e-6)


class CondBN(nn.Module):
    """Self-modulation (conditional BN): BN without affine, then x * (1 + gamma(c)) + beta(c);
    gamma/beta from a Dense layer on the global condition, or, local=True, from a 1x1
    conv on a spatial condition map (the attentional self-modulation of XMC-GAN Sec. 4.1).
    A condition map coarser than x is upsampled (nearest) after the 1x1 conv, not before as
    the original does: the two are equal (a 1x1 conv commutes with nearest upsampling), and
    this never builds the (text_dim + 2 z_dim)-channel map at full resolution."""

    def __init__(self, channels, cond_dim, local=False):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, momentum=0.1)  # flax momentum 0.9
        make = (
            (lambda: nn.Conv2d(cond_dim, channels, 1))
            if local
            else (lambda: nn.Linear(cond_dim, channels))
        )
        self.gamma, self.beta, self.local = make(), make(), local

    def forward(self, x, c):
        g, b = self.gamma(c), self.beta(c)
        if not self.local:
            g, b = g[:, :, None, None], b[:, :, None, None]
        elif g.shape[-2:] != x.shape[-2:]:
            g, b = (F.interpolate(t, size=x.shape[-2:], mode='nearest') for t in (g, b))
        return self.bn(x) * (g + 1) + b


class XMCGenBlock(nn.Module):
    """Residual up-block: CBN-ReLU-up-conv3-CBN-ReLU-conv3, shortcut up-conv1x1.
    local=True is GenSpatialBlock: both CBNs take the spatial condition, each at its own
    resolution (the second one at the upsampled resolution, as the original)."""

    def __init__(self, cin, cout, cond_dim, local=False):
        super().__init__()
        self.n1, self.n2 = CondBN(cin, cond_dim, local), CondBN(cout, cond_dim, local)
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.sc = nn.Conv2d(cin, cout, 1)

    def forward(self, x, c):
        h = F.interpolate(F.relu(self.n1(x, c)), scale_factor=2, mode='nearest')
        h = self.c2(F.relu(self.n2(self.c1(h), c)))
        return h + self.sc(F.interpolate(x, scale_factor=2, mode='nearest'))


def attention_for_g(regions, words, gamma, pad_mask):
    """Word-region attention of G: cosine x gamma, softmax over words (padding
    masked), context = attention-weighted sum of L2-normalised words.
    regions (B, R, D), words (B, T, D) -> (B, R, D), attention (B, R, T)."""
    r, w = l2n(regions), l2n(words)
    logits = gamma * r @ w.transpose(1, 2)
    if pad_mask is not None:
        logits = logits.masked_fill(pad_mask[:, None, :], -1e9)
    att = logits.softmax(-1)
    return att @ w, att


def contrastive_loss(a, b, tau):
    """InfoNCE both ways (Sec. 3.1, Eq. 1): cosine / tau against every item of the batch,
    cross-entropy with the pair's own as target, a->b plus b->a (summed, not averaged, as
    attention_lib.contrastive_loss). L_sent: (image, sentence); L_img: (fake, real) (Sec. 4.1)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    a_to_b, b_to_a = info_nce(a @ b.t() / tau)
    return a_to_b + b_to_a


def word_region_scores(regions, words, pad_mask, gamma1, gamma2):
    """S_word(image b, caption c) for every pair (Sec. 4.1; attention_lib.word_loss): each word
    attends over the L2-normalised regions with softmax(gamma1 * cos); S = log sum over the real
    words of exp(gamma2 * cos(word, its region context)), / gamma2.
    regions (B, R, D), words (C, T, D), pad_mask (C, T) True at padding -> (B, C)."""
    (regions, words), fp32 = _float32(regions, words)
    with fp32:
        r, w = F.normalize(regions, dim=-1), F.normalize(words, dim=-1)
        cos = torch.einsum('brd,ctd->bctr', r, w)  # (B, C, T, R)
        alpha = (gamma1 * cos).softmax(dim=3)
        gram = r @ r.transpose(1, 2) if gram_pays(r.shape[1], r.shape[2]) else None
        norm = _context_norm(
            alpha.transpose(0, 1), gram, lambda a: torch.einsum('cbtr,brd->cbtd', a, r)
        ).transpose(0, 1)
        sim = gamma2 * (alpha * cos).sum(3) / norm.clamp(min=1e-8)  # |w| = 1
    return torch.logsumexp(sim.masked_fill(pad_mask[None], float('-inf')), -1) / gamma2


def word_contrastive_loss(regions, words, pad_mask, gamma1, gamma2, gamma3):
    """L_word (Sec. 4.1): gamma3 * S_word, cross-entropy over captions per image plus over
    images per caption (AttnGAN's DAMSM word loss with XMC-GAN's 5 / 5 / 50)."""
    per_image, per_caption = info_nce(
        gamma3 * word_region_scores(regions, words, pad_mask, gamma1, gamma2)
    )
    return per_image + per_caption


class XMCGenerator(nn.Module):
    """XMC-GAN generator (Sec. 4.1): global condition [Dense(sentence); z] drives the
    self-modulated up-blocks to 16x16; there, word-region attention gives a region
    context that, with the tiled global condition, modulates the later blocks."""

    def __init__(self, img_size=128, gf_dim=96, z_dim=128, text_dim=768, gamma=15.0):
        super().__init__()
        if img_size not in XMC_G_CHANNELS:
            raise ValueError(
                f'XMC-GAN image size {img_size}: expected one of {sorted(XMC_G_CHANNELS)}'
            )
        ch = [gf_dim * m for m in XMC_G_CHANNELS[img_size]]
        self.z_dim, self.gf16, self.gamma = z_dim, gf_dim * 16, gamma
        gdim = 2 * z_dim
        self.sent_dense = nn.Linear(text_dim, z_dim)
        self.z_dense = nn.Linear(z_dim, gf_dim * 16 * 4 * 4)
        self.blocks = nn.ModuleList(
            [XMCGenBlock(gf_dim * 16, ch[0], gdim), XMCGenBlock(ch[0], ch[1], gdim)]
        )
        self.region_proj = nn.Conv2d(ch[1], text_dim, 1)
        sdim = text_dim + gdim
        self.spatial_blocks = nn.ModuleList(
            [XMCGenBlock(ch[i - 1], ch[i], sdim, local=True) for i in range(2, len(ch))]
        )
        self.out_norm = CondBN(ch[-1], sdim, local=True)
        self.to_rgb = nn.Conv2d(ch[-1], 3, 3, 1, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(m.weight)  # glorot_normal, as the original
                nn.init.zeros_(m.bias)

    def forward(self, z, sent, words, pad_mask):
        """z (B, z_dim), sent (B, D), words (B, T, D), pad_mask (B, T) -> image in [-1, 1]."""
        g = torch.cat([self.sent_dense(sent), z], 1)
        x = self.z_dense(z).view(-1, self.gf16, 4, 4)
        for blk in self.blocks:
            x = blk(x, g)
        B, _, H, W = x.shape
        ctx, _ = attention_for_g(
            self.region_proj(x).flatten(2).transpose(1, 2), words, self.gamma, pad_mask
        )
        cond = torch.cat(
            [ctx.transpose(1, 2).reshape(B, -1, H, W), g[:, :, None, None].expand(-1, -1, H, W)], 1
        )
        for blk in self.spatial_blocks:  # the 16x16 condition; CondBN upsamples its gamma/beta
            x = blk(x, cond)
        return torch.tanh(self.to_rgb(F.relu(self.out_norm(x, cond))))


def sn(m):
    return nn.utils.parametrizations.spectral_norm(m)


class XMCDiscBlock(nn.Module):
    """ReLU-conv3-ReLU-conv3 (+avg-pool), shortcut conv1x1 (+avg-pool); optimized=True
    is the first block (conv3-ReLU-conv3-pool, shortcut pool-conv1x1)."""

    def __init__(self, cin, cout, down, optimized=False):
        super().__init__()
        self.c1, self.c2 = sn(nn.Conv2d(cin, cout, 3, 1, 1)), sn(nn.Conv2d(cout, cout, 3, 1, 1))
        self.sc = sn(nn.Conv2d(cin, cout, 1)) if (down or cin != cout or optimized) else None
        self.down, self.optimized = down, optimized

    def forward(self, x):
        pool = (lambda t: F.avg_pool2d(t, 2)) if self.down else (lambda t: t)
        if self.optimized:
            return pool(self.c2(F.relu(self.c1(x)))) + self.sc(pool(x))
        h = pool(self.c2(F.relu(self.c1(F.relu(x)))))
        return h + pool(self.sc(x) if self.sc is not None else x)


class XMCDiscriminator(nn.Module):
    """Spectral-norm residual D with projection conditioning (Sec. 4.2). Returns the
    logit, the pooled feature (sentence and image contrastive losses), the projected
    sentence, and region features at cond_size x cond_size projected to the word
    dimension (word contrastive loss). Images arrive in [-1, 1] and are mapped linearly to
    input_range first: the original's D sees [0, 1] (its data, and G's (tanh + 1) / 2), and
    spectral norm makes the input scale matter."""

    def __init__(self, img_size=128, df_dim=96, text_dim=768, cond_size=16, input_range=(0.0, 1.0)):
        super().__init__()
        self.input_range = tuple(float(v) for v in input_range)
        mults, downs = XMC_D_CHANNELS[img_size]
        self.blocks = nn.ModuleList([XMCDiscBlock(3, df_dim, True, optimized=True)])
        c, size = df_dim, img_size // 2
        sizes = {size: (0, c)}  # feature size -> (block index, channels), the last block wins
        for i, (m, d) in enumerate(zip(mults, downs)):
            self.blocks.append(XMCDiscBlock(c, df_dim * m, d))
            c, size = df_dim * m, size // 2 if d else size
            sizes[size] = (i + 1, c)
        if cond_size not in sizes:
            raise utils.UserError(
                f'GAN.COND_SIZE={cond_size} at {img_size} px: expected one of {sorted(sizes)}'
            )
        self.cond_index, cond_ch = sizes[cond_size]
        self.out = sn(nn.Linear(c, 1))
        self.sent_proj = sn(nn.Linear(text_dim, c))
        self.region_proj = sn(nn.Conv2d(cond_ch, text_dim, 1))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_normal_(
                    m.parametrizations.weight.original
                    if hasattr(m, 'parametrizations')
                    else m.weight
                )
                nn.init.zeros_(m.bias)

    def forward(self, x, sent):
        lo, hi = self.input_range
        if (lo, hi) != (-1.0, 1.0):
            x = (x + 1) * ((hi - lo) / 2) + lo
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == self.cond_index:
                regions = self.region_proj(x).flatten(2).transpose(1, 2)  # (B, R, D)
        pooled = F.relu(x).sum((2, 3))
        sent_c = self.sent_proj(sent)
        logit = self.out(pooled).squeeze(1) + (pooled * sent_c).sum(1)
        return logit, pooled, sent_c, regions


RESNET50_FILES = (
    'resnet50-0676ba61.pth',
    'resnet50-11ad3fa6.pth',
)  # torchvision IMAGENET1K_V1, _V2
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# XMC-GAN's README: gsutil cp gs://gresearch/xmcgan/resnet_pretrained.npy data/
# (pretrained_model_utils.py _DEFAULT_RESNET_PATH), relative to the working directory as there
XMC_RESNET_NPY = os.path.join('data', 'resnet_pretrained.npy')


def same_pads(size, kernel, stride):
    """TF/Flax 'SAME' padding of one dimension: ceil(size / stride) outputs, the odd pixel after
    (PyTorch's padding is symmetric)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x, kernel, stride, value=0.0):
    (top, bottom), (left, right) = (
        same_pads(n, k, s) for n, k, s in zip(x.shape[-2:], kernel, stride)
    )
    return (
        F.pad(x, (left, right, top, bottom), value=value) if top or bottom or left or right else x
    )


def max_pool_same(x):
    """Flax nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME'): padded with -inf, which never
    wins a max."""
    return F.max_pool2d(pad_same(x, (3, 3), (2, 2), float('-inf')), 3, 2)


class SameConv2d(nn.Conv2d):
    """Flax nn.Conv without bias, padding 'SAME' (resnet_v1.py's convs)."""

    def __init__(self, cin, cout, kernel, stride=1):
        super().__init__(cin, cout, kernel, stride, bias=False)

    def forward(self, x):
        return super().forward(pad_same(x, self.kernel_size, self.stride))


class FlaxBottleneck(nn.Module):
    """resnet_v1.py BottleneckResNetBlock: 1x1, 3x3 (carries the stride), 1x1 to 4x filters, each
    with BatchNorm (Flax's epsilon 1e-5); proj_conv/proj_bn where the shape changes."""

    def __init__(self, cin, filters, stride):
        super().__init__()
        self.conv1, self.bn1 = SameConv2d(cin, filters, 1), nn.BatchNorm2d(filters)
        self.conv2, self.bn2 = SameConv2d(filters, filters, 3, stride), nn.BatchNorm2d(filters)
        self.conv3, self.bn3 = SameConv2d(filters, 4 * filters, 1), nn.BatchNorm2d(4 * filters)
        self.proj = stride != 1 or cin != 4 * filters
        if self.proj:
            self.proj_conv = SameConv2d(cin, 4 * filters, 1, stride)
            self.proj_bn = nn.BatchNorm2d(4 * filters)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu((self.proj_bn(self.proj_conv(x)) if self.proj else x) + y)


class FlaxResNetV1(nn.Module):
    """resnet_v1.py ResNet with bottleneck blocks (stage_sizes [3, 4, 6, 3], width 64: ResNet50),
    NCHW. Returns the head's logits (its `out`). Module names are the Flax ones, so
    `flax_tensors` maps the Flax variable tree by name."""

    def __init__(self, stage_sizes=(3, 4, 6, 3), width=64, num_classes=1000):
        super().__init__()
        self.init_conv, self.init_bn = SameConv2d(3, width, 7, 2), nn.BatchNorm2d(width)
        self.stages, cin = [], width
        for i, n in enumerate(stage_sizes):
            stage, filters = nn.Sequential(), width * 2**i
            for j in range(n):
                stage.add_module(
                    f'block{j + 1}', FlaxBottleneck(cin, filters, 2 if i and not j else 1)
                )
                cin = 4 * filters
            self.add_module(f'stage{i + 1}', stage)
            self.stages.append(stage)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.init_bn(self.init_conv(x))  # no ReLU before the pool in resnet_v1.py
        x = max_pool_same(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3)))

    def flax_tensors(self):
        """'params/stage1/block1/conv1/kernel' (a Flax variable path) -> (this net's tensor, the Flax
        shape, Flax -> PyTorch layout): conv kernels HWIO -> OIHW, the Dense kernel (in, out)."""
        out = {}
        for name, m in self.named_modules():
            p = name.replace('.', '/')
            if isinstance(m, SameConv2d):
                out[f'params/{p}/kernel'] = (
                    m.weight,
                    tuple(m.weight.permute(2, 3, 1, 0).shape),
                    lambda a: a.permute(3, 2, 0, 1),
                )
            elif isinstance(m, nn.BatchNorm2d):
                for key, t in (
                    ('params/{}/scale', m.weight),
                    ('params/{}/bias', m.bias),
                    ('batch_stats/{}/mean', m.running_mean),
                    ('batch_stats/{}/var', m.running_var),
                ):
                    out[key.format(p)] = (t, tuple(t.shape), None)
            elif isinstance(m, nn.Linear):
                out[f'params/{p}/kernel'] = (
                    m.weight,
                    (m.in_features, m.out_features),
                    lambda a: a.t(),
                )
                out[f'params/{p}/bias'] = (m.bias, tuple(m.bias.shape), None)
        return out


def load_flax_resnet(net, variables, path):
    """Copy the Flax variables {'params': ..., 'batch_stats': ...} into a FlaxResNetV1, strictly:
    every variable used, every shape checked, else one line naming the first key at fault."""
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, f'{prefix}{k}/')
            else:
                flat[f'{prefix}{k}'] = v

    if not isinstance(variables, dict):
        raise utils.UserError(
            f"{path}: holds a {type(variables).__name__}, not the Flax variables "
            "{'params': ..., 'batch_stats': ...}"
        )
    walk(variables, '')
    want = net.flax_tensors()
    missing, unexpected = [k for k in want if k not in flat], [k for k in flat if k not in want]
    for keys, what in ((missing, 'missing'), (unexpected, 'unexpected')):
        if keys:
            raise utils.UserError(
                f"{path}: {what} Flax ResNet-50 variable {keys[0]} "
                f"({len(keys)} {what}; the layout of XMC-GAN's resnet_v1.py ResNet50)"
            )
    with torch.no_grad():
        for k, (t, shape, to_torch) in want.items():
            a = flat[k]
            if not (isinstance(a, np.ndarray) and a.dtype.kind == 'f' and a.shape == shape):
                got = f'{a.dtype} {a.shape}' if isinstance(a, np.ndarray) else type(a).__name__
                raise utils.UserError(
                    f"{path}: Flax ResNet-50 variable {k} is {got}, expected float {shape}"
                )
            v = torch.from_numpy(a.astype(np.float32))
            t.copy_(to_torch(v) if to_torch else v)


class PretrainedResNet50(nn.Module):
    """The frozen ImageNet ResNet-50 of XMC-GAN's pretrained image contrastive loss: [-1, 1]
    images, bilinear to 224 (pretrained_model_utils.py), -> the 1000 logits (its `outputs`).
    weights: a .npy file (the original's resnet_pretrained.npy: resnet_v1.py's Flax ResNet50, fed
    [0, 1] images as the original does), a .pth file (torchvision's ResNet-50, fed ImageNet
    mean/std as its weights expect), 'auto' (the original's file where its README puts it,
    XMC_RESNET_NPY, else torchvision's cache) or '' (random torchvision init, for tests); a named
    file that is absent stops the run."""

    def __init__(self, weights='auto', log=None):
        super().__init__()
        path = weights
        if weights == 'auto':
            path = (
                XMC_RESNET_NPY
                if os.path.isfile(XMC_RESNET_NPY)
                else utils.hub_cached(*RESNET50_FILES)
            )
            if not os.path.isfile(path):
                raise utils.UserError(
                    f"{path}: ImageNet ResNet-50 weights not found (TRAIN.RESNET=auto looks for "
                    f"{XMC_RESNET_NPY}, then in torchvision's cache; give a .pth or XMC-GAN's "
                    "resnet_pretrained.npy, or '' for a random init)"
                )
        if path and not os.path.isfile(path):
            raise utils.UserError(f"{path}: ResNet-50 weights file not found (TRAIN.RESNET)")
        self.flax = path.endswith('.npy')
        if self.flax:
            self.net = FlaxResNetV1()
            tree = utils.safe_npy_load(path)
            if tree.shape != ():
                raise utils.UserError(
                    f"{path}: an array of shape {tree.shape}, not np.save of the Flax variables"
                )
            load_flax_resnet(self.net, tree.item(), path)
        else:
            import torchvision

            self.net = torchvision.models.resnet50(weights=None)
            if path:
                try:
                    self.net.load_state_dict(utils.load_weights(path))
                except (RuntimeError, AttributeError) as e:
                    raise utils.UserError(
                        f"{path}: not torchvision ResNet-50 weights ({str(e).splitlines()[0][:200]})"
                    )
            self.register_buffer(
                'mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
            )
            self.register_buffer(
                'std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False
            )
        if path and log:
            log.info(
                f"ResNet-50 ImageNet weights from {path}"
                + (" (XMC-GAN's Flax ResNet50)" if self.flax else '')
            )
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)  # frozen, BatchNorm statistics included

    def forward(self, images):
        # get_pretrained_embs: [0, 1] images, jax.image.resize 'bilinear' to 224, whose antialias=True
        # default filters when shrinking (256 px); fp32 as PyTorch's CPU antialiased resize has no bf16
        x = F.interpolate(
            (images.float() + 1) / 2,
            size=(224, 224),
            mode='bilinear',
            align_corners=False,
            antialias=True,
        )
        return self.net(x if self.flax else (x - self.mean) / self.std)


# ============================================================================
# DALLE: DiscreteVAE, taming VQGAN, DALLE transformer
# ============================================================================
# [section: dalle]
# Both image tokenizers share one interface: images in [-1, 1] -> get_codebook_indices
# (B, h*w) -> decode -> images in [-1, 1]; attributes image_size, fmap_size, num_tokens,
# hparams, class_name. DALLE only sees that interface.
class VAEResBlock(nn.Module):
    """DALLE-pytorch's ResBlock: conv3 -> ReLU -> conv3 -> ReLU -> conv1, plus the input."""

    def __init__(self, chan):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(chan, chan, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(chan, chan, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(chan, chan, 1),
        )

    def forward(self, x):
        return self.net(x) + x


class DiscreteVAE(nn.Module):
    """The discrete VAE of DALLE-pytorch (dalle_pytorch.py DiscreteVAE): num_layers strided
    4x4 convs, resblocks, a 1x1 conv to logits over the codebook; Gumbel-softmax picks (soft) codes,
    whose codebook vectors the transposed-conv decoder turns back into an image.
    Module names and shapes equal DALLE-pytorch 1.6.6's, so `vae.pt` files load both ways.
    quantizer='vq' (this project's option; its `vae.pt` DALLE-pytorch cannot read): the 1x1
    conv gives a vector in the codebook's space and its nearest code is taken (vq_forward).
    Works in DALLE-pytorch's normalised space: images in [-1, 1] (it normalises [0, 1]
    inputs by (x - 0.5) / 0.5 inside; we take them already normalised)."""

    class_name = 'DiscreteVAE'

    def __init__(
        self,
        image_size=256,
        num_tokens=512,
        codebook_dim=512,
        num_layers=3,
        num_resnet_blocks=0,
        hidden_dim=64,
        channels=3,
        quantizer='gumbel',
    ):
        super().__init__()
        if image_size % (2**num_layers):
            raise ValueError(
                f"image_size {image_size} is not divisible by 2**num_layers={2**num_layers}"
            )
        if quantizer not in VAE_QUANTIZERS:
            raise utils.UserError(
                f"VAE quantizer {quantizer!r}: expected one of {', '.join(VAE_QUANTIZERS)}"
            )
        self.hparams = dict(
            image_size=image_size,
            num_tokens=num_tokens,
            codebook_dim=codebook_dim,
            num_layers=num_layers,
            num_resnet_blocks=num_resnet_blocks,
            hidden_dim=hidden_dim,
            channels=channels,
        )
        if quantizer != 'gumbel':  # a DALLE-pytorch vae.pt names no quantizer: Gumbel's
            self.hparams['quantizer'] = quantizer
        self.quantizer = quantizer
        self.image_size, self.num_tokens = image_size, num_tokens
        self.fmap_size = image_size // 2**num_layers
        self.codebook = nn.Embedding(num_tokens, codebook_dim)
        enc, cin = [], channels
        for _ in range(num_layers):
            enc.append(
                nn.Sequential(
                    nn.Conv2d(cin, hidden_dim, 4, stride=2, padding=1), nn.ReLU(inplace=True)
                )
            )
            cin = hidden_dim
        enc += [VAEResBlock(hidden_dim) for _ in range(num_resnet_blocks)]
        # Gumbel: logits over the codes; VQ: a vector in the codebook's space
        enc.append(nn.Conv2d(hidden_dim, num_tokens if quantizer == 'gumbel' else codebook_dim, 1))
        dec = [nn.Conv2d(codebook_dim, hidden_dim, 1)] if num_resnet_blocks else []
        dec += [VAEResBlock(hidden_dim) for _ in range(num_resnet_blocks)]
        cin = hidden_dim if num_resnet_blocks else codebook_dim
        for _ in range(num_layers):
            dec.append(
                nn.Sequential(
                    nn.ConvTranspose2d(cin, hidden_dim, 4, stride=2, padding=1),
                    nn.ReLU(inplace=True),
                )
            )
            cin = hidden_dim
        dec.append(nn.Conv2d(hidden_dim, channels, 1))
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def forward(self, images, temperature=0.9, hard=False, reinmax=False):
        """Training pass: (reconstruction, logits (B, num_tokens, h, w), the VQ loss or None).
        Gumbel: the soft one-hot from Gumbel-softmax mixes codebook vectors (hard=True:
        straight-through; with reinmax=True the straight-through gradient is ReinMax's, as
        upstream DALLE-pytorch's `reinmax` option). VQ: vq_forward."""
        if self.quantizer == 'vq':
            return self.vq_forward(images)
        logits = self.encoder(images)
        # Gumbel noise from uniforms: the distribution of F.gumbel_softmax, whose exponential_
        # sampler took 40% of a CPU training step; codes on the last axis (contiguous softmax)
        lg = logits.permute(0, 2, 3, 1).float()
        u = torch.rand(lg.shape, device=lg.device).clamp_(1e-20, 1.0)
        noisy = lg - torch.log(-torch.log(u))
        book = self.codebook.weight
        if not hard:
            soft = (noisy / temperature).softmax(-1) @ book.float()
            return self.decoder(soft.permute(0, 3, 1, 2)), logits, None
        idx = noisy.argmax(dim=-1)  # a sample of softmax(logits), whatever the temperature
        if reinmax:
            # ReinMax (Liu et al. 2023, Alg. 2): a second-order (Heun) estimate of the gradient
            # through the sample D: pi1 = (D + softmax(l / t)) / 2 reparametrised at l, 2 pi1 - pi0 / 2
            pi0 = lg.softmax(-1)
            pi1 = ((lg / temperature).softmax(-1) / 2).scatter_add(
                -1, idx[..., None], torch.full_like(lg[..., :1], 0.5)
            )
            pi1 = ((pi1.log() - lg).detach() + lg).softmax(-1)
            grad_path = 2 * pi1 - pi0 / 2
        else:
            # straight-through: the gradients of (one_hot - soft.detach() + soft) @ codebook
            grad_path = (noisy / temperature).softmax(-1)
        # the forward takes the sampled code's vector; the codebook gets the hard code's gradient
        z_soft = grad_path @ book.detach().float()
        z = F.embedding(idx, book).float() + z_soft - z_soft.detach()
        return self.decoder(z.permute(0, 3, 1, 2)), logits, None

    def code_distances(self, z_e):
        """Squared distances (B, h, w, num_tokens) of encoder outputs (B, D, h, w) to the codes,
        in float32 under any autocast (bf16 |z|^2 - 2 z.e + |e|^2 picks a wrong nearest code for
        about a third of the tokens)."""
        return squared_distances(z_e.permute(0, 2, 3, 1), self.codebook.weight)

    def vq_forward(self, images, beta=0.25):
        """VQ-VAE (van den Oord et al. 2017, Sec. 3.1): each encoder output z_e is replaced by
        its nearest code e, the decoder's gradient copied straight through to z_e; the loss
        ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2 (Eq. 3, beta 0.25) moves the codes and
        commits the encoder. The logits are minus the distances: their argmax is the code."""
        z_e = self.encoder(images)
        dist = self.code_distances(z_e)
        z_q = F.embedding(dist.argmin(-1), self.codebook.weight).float()  # (B, h, w, D)
        z_e = z_e.float().permute(0, 2, 3, 1)
        loss = F.mse_loss(z_q, z_e.detach()) + beta * F.mse_loss(z_e, z_q.detach())
        z = z_e + (z_q - z_e).detach()
        return self.decoder(z.permute(0, 3, 1, 2)), -dist.permute(0, 3, 1, 2), loss

    @torch.no_grad()
    def get_codebook_indices(self, images):
        """Hard tokens (B, h*w): argmax of the logits, no Gumbel noise; VQ: the nearest code."""
        if self.quantizer == 'vq':
            return self.code_distances(self.encoder(images)).argmin(-1).flatten(1)
        return self.encoder(images).max(1).indices.flatten(1)  # = argmax(1), 3x faster on CPU

    def decode(self, indices):
        b, n = indices.shape
        side = int(math.isqrt(n))
        z = self.codebook(indices).view(b, side, side, -1).permute(0, 3, 1, 2)
        return self.decoder(z)


# ---- taming-transformers VQGAN (Esser et al. 2021): inference only ---------------------------
# Module names, shapes and block order equal taming's VQModel (the key list of the ImageNet
# f16/1024 checkpoint is in tests/data), so its `last.ckpt` loads with strict=True.
def _group_norm(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class TamingResBlock(nn.Module):
    """GroupNorm -> swish -> conv3, twice, plus the input (a 1x1 `nin_shortcut` when the
    width changes)."""

    def __init__(self, cin, cout, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x) + h


class TamingAttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions, 1x1 convs for q, k, v, out."""

    def __init__(self, c):
        super().__init__()
        self.norm = _group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class TamingDownsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right/bottom only


class TamingUpsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class TamingEncoder(nn.Module):
    def __init__(
        self,
        ch,
        ch_mult,
        num_res_blocks,
        attn_resolutions,
        resolution,
        z_channels,
        in_channels=3,
        double_z=False,
        dropout=0.0,
        **_,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        res, cin, self.down = resolution, ch, nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(TamingResBlock(cin, ch * mult, dropout))
                cin = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(TamingAttnBlock(cin))
            if level != len(ch_mult) - 1:
                stage.downsample = TamingDownsample(cin)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = TamingResBlock(cin, cin, dropout), TamingAttnBlock(cin)
        self.mid.block_2 = TamingResBlock(cin, cin, dropout)
        self.norm_out = _group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, 'downsample'):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class TamingDecoder(nn.Module):
    def __init__(
        self,
        ch,
        ch_mult,
        num_res_blocks,
        attn_resolutions,
        resolution,
        z_channels,
        out_ch=3,
        dropout=0.0,
        **_,
    ):
        super().__init__()
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = TamingResBlock(cin, cin, dropout), TamingAttnBlock(cin)
        self.mid.block_2 = TamingResBlock(cin, cin, dropout)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(TamingResBlock(cin, ch * ch_mult[level], dropout))
                cin = ch * ch_mult[level]
                if res in attn_resolutions:
                    stage.attn.append(TamingAttnBlock(cin))
            if level != 0:
                stage.upsample = TamingUpsample(cin)
                res *= 2
            stages.insert(0, stage)  # up[0] is the finest level, as in taming
        self.up = nn.ModuleList(stages)
        self.norm_out = _group_norm(cin)
        self.conv_out = nn.Conv2d(cin, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, 'upsample'):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def squared_distances(x, book):
    """|x - e|^2 (..., K) of vectors x (..., D) to each row e of book (K, D), in float32 whatever
    autocast is on: the expanded form loses the nearest code's margin in bf16."""
    (x, book), fp32 = _float32(x, book)
    with fp32:
        return x.pow(2).sum(-1, keepdim=True) - 2 * x @ book.t() + book.pow(2).sum(-1)


class VectorQuantizer(nn.Module):
    """Nearest codebook vector (VQ-VAE); only the lookup is needed to tokenise and decode."""

    def __init__(self, n_embed, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z):
        d = squared_distances(z.permute(0, 2, 3, 1), self.embedding.weight)
        return d.argmin(-1).view(z.shape[0], -1)


class VQGAN(nn.Module):
    """taming's VQModel (encoder, quant_conv, quantize, post_quant_conv, decoder) at the
    config's ddconfig, as a frozen image tokenizer for DALLE."""

    class_name = 'VQGAN'

    def __init__(self, ddconfig, n_embed, embed_dim):
        super().__init__()
        self.hparams = dict(ddconfig=dict(ddconfig), n_embed=n_embed, embed_dim=embed_dim)
        self.encoder, self.decoder = TamingEncoder(**ddconfig), TamingDecoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig['z_channels'], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig['z_channels'], 1)
        self.image_size, self.num_tokens = ddconfig['resolution'], n_embed
        self.fmap_size = ddconfig['resolution'] // 2 ** (len(ddconfig['ch_mult']) - 1)

    @torch.no_grad()
    def get_codebook_indices(self, images):
        return self.quantize.indices(self.quant_conv(self.encoder(images)))

    def decode(self, indices):
        b, n = indices.shape
        side = int(math.isqrt(n))
        z = self.quantize.embedding(indices).view(b, side, side, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)


def read_vqgan_config(path):
    """model.yaml of taming-transformers -> (ddconfig, n_embed, embed_dim)."""
    cfg = utils.load_yaml(path)
    try:
        p = cfg['model']['params']
        target = cfg['model'].get('target', 'taming.models.vqgan.VQModel')
        dd, n_embed, embed_dim = dict(p['ddconfig']), int(p['n_embed']), int(p['embed_dim'])
    except (KeyError, TypeError, ValueError) as e:
        raise utils.UserError(
            f"{path}: expected taming's model.params.{{ddconfig, n_embed, embed_dim}} ({e})"
        )
    if not target.endswith('VQModel'):
        raise utils.UserError(
            f"{path}: model.target={target}: only taming.models.vqgan.VQModel is supported"
        )
    return dd, n_embed, embed_dim


def load_vqgan(model_path, config_path):
    """The public taming checkpoint (a Lightning `last.ckpt` with 'state_dict', or a bare
    state dict) with strict=True; the training loss's 'loss.*' entries (discriminator,
    LPIPS) are dropped, every other key must match."""
    dd, n_embed, embed_dim = read_vqgan_config(config_path)
    vae = VQGAN(dd, n_embed, embed_dim)
    if not os.path.isfile(model_path):
        raise utils.UserError(f"{model_path}: VQGAN checkpoint not found")
    try:
        ckpt = torch.load(model_path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise utils.UserError(
            f"{model_path}: torch.load(weights_only=True) refused it ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); if you trust the file, extract its weights once: "
            "python -c \"import torch; c=torch.load('last.ckpt', weights_only=False); "
            "torch.save({'state_dict': c['state_dict']}, 'vqgan_weights.ckpt')\""
        )
    sd = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise utils.UserError(f"{model_path}: expected a dict with 'state_dict' or a state dict")
    sd = {k: v for k, v in sd.items() if not k.startswith('loss.')}
    try:
        vae.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise utils.UserError(
            f"{model_path}: does not match {config_path} ({' '.join(str(e).split())[:400]})"
        )
    return vae


def build_vae(class_name, hparams):
    if class_name == 'DiscreteVAE':
        return DiscreteVAE(**hparams)
    if class_name == 'VQGAN':
        return VQGAN(**hparams)
    raise utils.UserError(f"vae class {class_name!r}: expected DiscreteVAE or VQGAN")


# DiscreteVAE's constructor arguments in DALLE-pytorch (dalle_pytorch.py DiscreteVAE) that only
# shape its training loss or its Gumbel sampling; tokenising and decoding do not read them.
DP_VAE_TRAINING_ONLY = (
    'smooth_l1_loss',
    'temperature',
    'straight_through',
    'reinmax',
    'kl_div_loss_weight',
)
VAE_QUANTIZERS = ('gumbel', 'vq')
DP_VAE_ARCH = (
    'image_size',
    'num_tokens',
    'codebook_dim',
    'num_layers',
    'num_resnet_blocks',
    'hidden_dim',
    'channels',
)


def discrete_vae_from_hparams(hparams, where):
    """A DiscreteVAE from DALLE-pytorch's vae_params (or ours). A key DiscreteVAE does not take
    is an error naming it; the training-only ones are accepted; `normalization` must be the
    default (0.5, 0.5) per channel, the [-1, 1] space this DiscreteVAE works in."""
    if not isinstance(hparams, dict):
        raise utils.UserError(f"{where}: VAE hparams are {type(hparams).__name__}, expected a dict")
    unknown = sorted(
        set(hparams) - set(DP_VAE_ARCH) - set(DP_VAE_TRAINING_ONLY) - {'normalization', 'quantizer'}
    )
    if unknown:
        raise utils.UserError(f"{where}: VAE hparams {unknown} are not DiscreteVAE arguments")
    channels = hparams.get('channels', 3)
    if channels != 3:
        raise utils.UserError(
            f"{where}: VAE hparams channels={channels}: only RGB (3) images are used here"
        )
    norm = hparams.get('normalization', ((0.5,) * 3, (0.5,) * 3))
    try:
        norm_ok = [tuple(float(v) for v in t[:channels]) for t in norm] == [(0.5,) * 3] * 2
    except TypeError:
        norm_ok = False
    if not norm_ok:
        raise utils.UserError(
            f"{where}: VAE hparams normalization={norm!r}: only DALLE-pytorch's default "
            "((0.5,)*3, (0.5,)*3) is supported"
        )
    return DiscreteVAE(**{k: hparams[k] for k in (*DP_VAE_ARCH, 'quantizer') if k in hparams})


def _load_strict(module, state, where, what):
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise utils.UserError(f"{where}: {what} ({' '.join(str(e).split())[:300]})")


def load_discrete_vae(path):
    """A DALLE-pytorch `vae.pt` ({'hparams', 'weights'}, as train_vae.py also writes it) or a
    train_vae.py training checkpoint."""
    if not os.path.isfile(path):
        raise utils.UserError(f"{path}: VAE file not found")
    obj = utils.load_weights(path)
    if is_dalle_pytorch_checkpoint(obj):
        raise utils.UserError(
            f"{path}: a DALLE-pytorch DALLE checkpoint, not a VAE; give it as --dalle_path"
        )
    if isinstance(obj, dict) and 'hparams' in obj and 'weights' in obj:
        hparams, weights = obj['hparams'], obj['weights']
    elif isinstance(obj, dict) and obj.get('kind') == 'vae':
        hparams, weights = obj['extra']['hparams'], obj['models']['vae']
    else:
        raise utils.UserError(
            f"{path}: expected DALLE-pytorch's {{'hparams', 'weights'}} or a "
            "train_vae.py checkpoint"
        )
    vae = discrete_vae_from_hparams(hparams, path)
    _load_strict(vae, weights, path, 'weights do not match its hparams')
    return vae


# ---- DALLE (Ramesh et al. 2021) as DALLE-pytorch builds it -----------------------------------
class KVCache:
    """Keys and values of every past position of one attention layer, preallocated so
    sampling appends one position per step without copying the past."""

    def __init__(self):
        self.k = self.v = None
        self.len = 0

    def append(self, k, v, max_len):
        if self.k is None:
            shape = (k.shape[0], k.shape[1], max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        n = k.shape[2]
        self.k[:, :, self.len : self.len + n], self.v[:, :, self.len : self.len + n] = k, v
        self.len += n
        return self.k[:, :, : self.len], self.v[:, :, : self.len]


def causal_attention_matmul(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v as two matmuls: on CPU in bf16 its forward and
    backward take 0.6x the time of SDPA's flash kernel at DALLE's short sequences (fp32 and
    CUDA keep SDPA, which is faster there)."""
    n = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float('-inf'))
    return s.softmax(-1).to(v.dtype) @ v


ATTN_DROPOUT_AT = ('output', 'weights')


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: qkv without bias, dim_head^-0.5 scaling (DALLE-pytorch
    attention.py), computed by scaled_dot_product_attention. Dropout at 'output' is
    DALLE-pytorch's (to_out = Linear then Dropout); 'weights' drops attention probabilities."""

    def __init__(self, dim, heads, dim_head, dropout=0.0, dropout_at='output'):
        super().__init__()
        if dropout_at not in ATTN_DROPOUT_AT:
            raise utils.UserError(
                f"MODEL.ATTN_DROPOUT_AT={dropout_at!r}: expected one of {', '.join(ATTN_DROPOUT_AT)}"
            )
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.dropout_at = dropout_at
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x, cache=None, max_len=None):
        B, N, _ = x.shape
        q, k, v = self.to_qkv(x).view(B, N, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        p_weights = self.dropout if self.training and self.dropout_at == 'weights' else 0.0
        past = 0
        if cache is not None:
            past = cache.len
            k, v = cache.append(k, v, max_len)
        if past and N > 1:  # a block of new positions after a cached prefix
            mask = torch.ones(N, past + N, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_weights)
        elif N > 1 and x.device.type == 'cpu' and q.dtype == torch.bfloat16 and not p_weights:
            y = causal_attention_matmul(q, k, v)
        else:  # full causal pass, or one new position seeing all
            y = F.scaled_dot_product_attention(q, k, v, is_causal=N > 1, dropout_p=p_weights)
        y = self.to_out(y.transpose(1, 2).reshape(B, N, -1))
        if self.dropout_at == 'output':
            y = F.dropout(y, self.dropout, self.training)
        return y


class GEGLUFeedForward(nn.Module):
    """Linear(dim, 2·mult·dim) -> GEGLU -> Linear(mult·dim, dim) (DALLE-pytorch transformer.py)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(dim, dim * mult * 2), nn.Linear(dim * mult, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x, gate = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(self.drop(x * F.gelu(gate)))


class DALLEBlock(nn.Module):
    """Pre-norm residual block with LayerScale (CaiT): x + γ·f(LN(x)). γ starts at 0.1 for the
    first 18 layers, 1e-5 up to 24, 1e-6 after (DALLE-pytorch's per-layer rule)."""

    def __init__(
        self,
        dim,
        heads,
        dim_head,
        layer,
        attn_dropout=0.0,
        ff_dropout=0.0,
        attn_dropout_at='output',
    ):
        super().__init__()
        eps = 0.1 if layer <= 18 else 1e-5 if layer <= 24 else 1e-6
        self.norm_attn, self.attn = (
            nn.LayerNorm(dim),
            CausalSelfAttention(dim, heads, dim_head, attn_dropout, attn_dropout_at),
        )
        self.norm_ff, self.ff = nn.LayerNorm(dim), GEGLUFeedForward(dim, 4, ff_dropout)
        self.scale_attn = nn.Parameter(torch.full((dim,), eps))
        self.scale_ff = nn.Parameter(torch.full((dim,), eps))

    def forward(self, x, cache=None, max_len=None):
        x = x + self.attn(self.norm_attn(x), cache, max_len) * self.scale_attn
        return x + self.ff(self.norm_ff(x)) * self.scale_ff


class DALLE(nn.Module):
    """One causal transformer over [<bos>, text (text_seq_len), image tokens (fmap²)].
    Padding (id 0) in the text becomes a distinct id per position (num_text_tokens +
    position) so that padding is predictable; one output head over text ids then image ids,
    where text positions may only predict text and image positions only image tokens
    (the logits mask of DALLE-pytorch; here each part is computed over its own slice of the
    head, which equals the masked softmax and skips the masked logits). Positions: learned
    embeddings for the text, an axial (row + column) embedding for the image grid.
    Parameter count equals DALLE-pytorch 1.6.6's DALLE with train_dalle.py's defaults."""

    def __init__(
        self,
        num_text_tokens,
        text_seq_len,
        num_image_tokens,
        image_fmap_size,
        dim=512,
        depth=2,
        heads=8,
        dim_head=64,
        attn_dropout=0.0,
        ff_dropout=0.0,
        loss_img_weight=7.0,
        attn_dropout_at='output',
    ):
        super().__init__()
        self.hparams = dict(
            num_text_tokens=num_text_tokens,
            text_seq_len=text_seq_len,
            num_image_tokens=num_image_tokens,
            image_fmap_size=image_fmap_size,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            loss_img_weight=loss_img_weight,
            attn_dropout_at=attn_dropout_at,
        )
        self.text_seq_len, self.image_seq_len = text_seq_len, image_fmap_size**2
        self.num_text_tokens = num_text_tokens + text_seq_len  # + a pad id per position
        self.num_image_tokens, self.loss_img_weight = num_image_tokens, loss_img_weight
        self.text_emb = nn.Embedding(self.num_text_tokens, dim)
        self.image_emb = nn.Embedding(num_image_tokens, dim)
        self.text_pos_emb = nn.Embedding(text_seq_len + 1, dim)  # +1 for <bos>
        self.image_pos_row = nn.Parameter(torch.randn(image_fmap_size, dim))
        self.image_pos_col = nn.Parameter(torch.randn(image_fmap_size, dim))
        self.blocks = nn.ModuleList(
            DALLEBlock(dim, heads, dim_head, i + 1, attn_dropout, ff_dropout, attn_dropout_at)
            for i in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, self.num_text_tokens + num_image_tokens)

    @property
    def seq_len(self):
        return self.text_seq_len + self.image_seq_len

    def text_with_bos(self, text):
        """(B, text_seq_len) ids with 0 = padding -> (B, 1 + text_seq_len): <bos>=0, then the
        text with each padding position given its own id."""
        pad_ids = (
            torch.arange(self.text_seq_len, device=text.device)
            + self.num_text_tokens
            - self.text_seq_len
        )
        return F.pad(torch.where(text == 0, pad_ids, text), (1, 0), value=0)

    def image_pos(self, start, n):
        idx = torch.arange(start, start + n, device=self.image_pos_row.device)
        f = self.image_pos_row.shape[0]
        return self.image_pos_row[idx // f] + self.image_pos_col[idx % f]

    def embed(self, text_bos=None, image=None, image_start=0):
        """Token + position embeddings of the text part and/or image tokens from image_start."""
        parts = []
        if text_bos is not None:
            parts.append(self.text_emb(text_bos) + self.text_pos_emb.weight[: text_bos.shape[1]])
        if image is not None and image.shape[1]:
            parts.append(self.image_emb(image) + self.image_pos(image_start, image.shape[1]))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def transformer(self, x, caches=None):
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None, self.seq_len)
        return self.norm_out(x)

    def text_logits(self, h):
        return F.linear(
            h,
            self.to_logits.weight[: self.num_text_tokens],
            self.to_logits.bias[: self.num_text_tokens],
        )

    def image_logits(self, h):
        return F.linear(
            h,
            self.to_logits.weight[self.num_text_tokens :],
            self.to_logits.bias[self.num_text_tokens :],
        )

    def forward(self, text, image):
        """Training loss (CE_text + w·CE_img) / (w + 1), w = loss_img_weight (DALLE-pytorch).
        text (B, text_seq_len), image tokens (B, image_seq_len). Returns (loss, CE_text, CE_img)."""
        tb = self.text_with_bos(text)
        h = self.transformer(self.embed(tb, image[:, :-1]))  # the last token predicts nothing
        T = self.text_seq_len
        loss_text = F.cross_entropy(
            self.text_logits(h[:, :T]).flatten(0, 1).float(), tb[:, 1:].flatten()
        )
        loss_img = F.cross_entropy(
            self.image_logits(h[:, T:]).flatten(0, 1).float(), image.flatten()
        )
        w = self.loss_img_weight
        return (loss_text + w * loss_img) / (w + 1), loss_text, loss_img

    def masked_logits(self, text, image):
        """DALLE-pytorch's formulation, for checking: logits over the joint vocabulary with
        text positions masked off the image ids and image positions off the text ids."""
        tb = self.text_with_bos(text)
        h = self.transformer(self.embed(tb, image[:, :-1]))
        logits = self.to_logits(h)
        pos = torch.arange(h.shape[1], device=h.device)[:, None]
        ids = torch.arange(logits.shape[-1], device=h.device)[None]
        is_img_pos, is_img_id = pos >= self.text_seq_len, ids >= self.num_text_tokens
        return logits.masked_fill(is_img_pos != is_img_id, -torch.finfo(logits.dtype).max), tb

    @torch.no_grad()
    def generate_image_tokens(
        self, text, top_k=0.9, temperature=1.0, generator=None, use_cache=True, top_k_over='all'
    ):
        """Sample image tokens for text (B, text_seq_len). top_k < 1 is DALLE-pytorch's
        filter_thres: keep the best max(1, int((1 - top_k)·n)) tokens, where n counts the whole
        text + image vocabulary as DALLE-pytorch's top_k does (top_k_over='all'; with a large
        text vocabulary it keeps every image token) or the image vocabulary only ('image');
        top_k >= 1: keep that many. Then argmax(logits/temperature + Gumbel noise). With
        use_cache, the text is run once and every later step feeds one token through the
        cached keys/values."""
        tb = self.text_with_bos(text)
        B, dev = text.shape[0], text.device
        if top_k_over not in ('all', 'image'):
            raise utils.UserError(f"TOP_K_OVER={top_k_over!r}: expected all or image")
        vocab = self.num_image_tokens + (self.num_text_tokens if top_k_over == 'all' else 0)
        k = max(1, int((1 - top_k) * vocab)) if top_k < 1 else int(top_k)
        k = min(k, self.num_image_tokens)  # masked text logits never win a draw
        caches = [KVCache() for _ in self.blocks] if use_cache else None
        out = torch.empty(B, 0, dtype=torch.long, device=dev)
        for i in range(self.image_seq_len):
            if use_cache:
                x = self.embed(tb) if i == 0 else self.embed(None, out[:, -1:], i - 1)
            else:
                x = self.embed(tb, out)
            h = self.transformer(x, caches)[:, -1]
            logits = self.image_logits(h).float()
            kth = logits.topk(k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float('-inf'))
            u = torch.rand(logits.shape, generator=generator, device=dev)
            gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
            out = torch.cat(
                [out, (logits / max(temperature, 1e-8) + gumbel).argmax(-1, keepdim=True)], 1
            )
        return out


# ---- a trained DALLE (train_dalle.py writes it; dalle_gen.py samples it) ----------------------
def load_dalle(ckpt, device):
    """DALLE, its VAE and tokenizer rebuilt from a train_dalle.py checkpoint."""
    x = ckpt['extra']
    vae = build_vae(x['vae_class_name'], x['vae_params'])
    dalle = DALLE(**x['hparams'])
    vae.load_state_dict(ckpt['models']['vae'])
    dalle.load_state_dict(ckpt['models']['dalle'])
    return (
        dalle.to(device),
        vae.to(device).eval().requires_grad_(False),
        utils.DalleTokenizer(x['tokenizer']),
    )


# ---- DALLE-pytorch checkpoints (lucidrains/DALLE-pytorch train_dalle.py save_model) ----------
# {'hparams': dalle_params, 'vae_params', 'epoch', 'version', 'vae_class_name',
#  'weights': dalle.state_dict(), 'opt_state', 'scheduler_state'}; the DALLE's state dict holds
# the frozen VAE under 'vae.' (DiscreteVAE names as ours; VQGanVAE wraps taming's VQModel as
# 'vae.model.'). Names below are those of dalle_pytorch.py DALLE, transformer.py (LayerScale ->
# PreNorm -> CachedAs -> Attention, FeedForward.net) and attention.py, versions 1.4.0 (where
# CachedAs came in) to 1.6.6.
# DALLE.__init__ defaults, used for hparams a checkpoint lacks (train_dalle.py writes them all).
DP_DALLE_DEFAULTS = dict(
    heads=8,
    dim_head=64,
    reversible=False,
    attn_dropout=0.0,
    ff_dropout=0.0,
    sparse_attn=False,
    attn_types=None,
    loss_img_weight=7,
    stable=False,
    sandwich_norm=False,
    shift_tokens=True,
    rotary_emb=True,
    shared_attn_ids=None,
    shared_ff_ids=None,
    share_input_output_emb=False,
    optimize_for_inference=False,
)
# hparams whose other values build a different network than models.DALLE (DALLE-pytorch's
# train_dalle.py default model: full attention, learned positions, no token shift)
DP_DALLE_FIXED = dict(
    reversible=False,
    sparse_attn=False,
    stable=False,
    sandwich_norm=False,
    shift_tokens=False,
    rotary_emb=False,
    share_input_output_emb=False,
)
_DP_BLOCK = r'transformer\.layers\.layers\.(\d+)\.'
DP_DALLE_KEYS = [  # DALLE-pytorch name pattern -> ours
    (r'text_emb\.weight', 'text_emb.weight'),
    (r'image_emb\.weight', 'image_emb.weight'),
    (r'text_pos_emb\.weight', 'text_pos_emb.weight'),
    # axial_positional_embedding < 0.3 names them weights_0/1, >= 0.3 an nn.ParameterList
    (r'image_pos_emb\.weights[_.]0', 'image_pos_row'),
    (r'image_pos_emb\.weights[_.]1', 'image_pos_col'),
    (_DP_BLOCK + r'0\.scale', r'blocks.\1.scale_attn'),
    (_DP_BLOCK + r'0\.fn\.norm\.(weight|bias)', r'blocks.\1.norm_attn.\2'),
    (_DP_BLOCK + r'0\.fn\.fn\.fn\.to_qkv\.weight', r'blocks.\1.attn.to_qkv.weight'),
    (_DP_BLOCK + r'0\.fn\.fn\.fn\.to_out\.0\.(weight|bias)', r'blocks.\1.attn.to_out.\2'),
    (_DP_BLOCK + r'1\.scale', r'blocks.\1.scale_ff'),
    (_DP_BLOCK + r'1\.fn\.norm\.(weight|bias)', r'blocks.\1.norm_ff.\2'),
    (_DP_BLOCK + r'1\.fn\.fn\.net\.0\.(weight|bias)', r'blocks.\1.ff.fc_in.\2'),
    (_DP_BLOCK + r'1\.fn\.fn\.net\.3\.(weight|bias)', r'blocks.\1.ff.fc_out.\2'),
    (r'to_logits\.0\.(weight|bias)', r'norm_out.\1'),
    (r'to_logits\.1\.(weight|bias)', r'to_logits.\1'),
]


def is_dalle_pytorch_checkpoint(obj):
    return (
        isinstance(obj, dict)
        and 'kind' not in obj
        and {'hparams', 'vae_params', 'weights'} <= set(obj)
    )


def dalle_pytorch_key(key):
    """DALLE-pytorch DALLE parameter name -> ours (None if it has no counterpart)."""
    for pattern, ours in DP_DALLE_KEYS:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, ours, key)
    return None


def dalle_pytorch_param_names(depth, axial_sep='_'):
    """DALLE-pytorch's trainable parameters in DALLE.parameters() order (the order of its
    optimizer state): text_pos_emb, image_pos_emb, transformer (each LayerScale's scale before
    its PreNorm's norm and function), to_logits, text_emb, image_emb; the frozen VAE has none."""
    names = ['text_pos_emb.weight'] + [f'image_pos_emb.weights{axial_sep}{i}' for i in (0, 1)]
    for i in range(depth):
        p = f'transformer.layers.layers.{i}'
        for part, fn in (
            ('0', ('fn.fn.to_qkv.weight', 'fn.fn.to_out.0.weight', 'fn.fn.to_out.0.bias')),
            ('1', ('fn.net.0.weight', 'fn.net.0.bias', 'fn.net.3.weight', 'fn.net.3.bias')),
        ):
            names += [f'{p}.{part}.scale', f'{p}.{part}.fn.norm.weight', f'{p}.{part}.fn.norm.bias']
            names += [f'{p}.{part}.fn.{x}' for x in fn]
    return names + [
        'to_logits.0.weight',
        'to_logits.0.bias',
        'to_logits.1.weight',
        'to_logits.1.bias',
        'text_emb.weight',
        'image_emb.weight',
    ]


def _dalle_pytorch_shape(name, ours):
    """The shape DALLE-pytorch stores our weight `name` (shape `ours`) in: LayerScale's scale is
    (1, 1, dim), the axial position embeddings (1, rows, 1, dim) and (1, 1, cols, dim)."""
    if name.endswith(('scale_attn', 'scale_ff')):
        return (1, 1) + ours
    if name == 'image_pos_row':
        return (1, ours[0], 1, ours[1])
    if name == 'image_pos_col':
        return (1, 1) + ours
    return ours


def dalle_pytorch_hparams(hparams, path):
    """DALLE-pytorch's dalle_params -> models.DALLE keyword arguments (without the image
    tokenizer's num_image_tokens, image_fmap_size). A key DALLE-pytorch's DALLE does not take,
    or a value that builds another network, is an error naming it."""
    if not isinstance(hparams, dict):
        raise utils.UserError(f"{path}: 'hparams' is {type(hparams).__name__}, expected a dict")
    required = ('num_text_tokens', 'text_seq_len', 'dim', 'depth')
    unknown = sorted(set(hparams) - set(DP_DALLE_DEFAULTS) - set(required))
    if unknown:
        raise utils.UserError(f"{path}: hparams {unknown} are not DALLE-pytorch DALLE arguments")
    missing = [k for k in required if k not in hparams]
    if missing:
        raise utils.UserError(f"{path}: hparams lack {missing}")
    hp = {**DP_DALLE_DEFAULTS, **hparams}
    for key, value in DP_DALLE_FIXED.items():
        if bool(hp[key]) != value:
            raise utils.UserError(
                f"{path}: hparams {key}={hp[key]!r} is not supported: models.DALLE is "
                f"DALLE-pytorch's train_dalle.py default model ({key}={value})"
            )
    types = hp['attn_types'] if hp['attn_types'] is not None else ('full',)
    if isinstance(types, str) or any(t != 'full' for t in types):
        raise utils.UserError(
            f"{path}: hparams attn_types={hp['attn_types']!r} is not supported (only full attention)"
        )
    depth = int(hp['depth'])
    for key in ('shared_attn_ids', 'shared_ff_ids'):
        ids = hp[key]
        if ids is not None:
            cycled = [ids[i % len(ids)] for i in range(depth)]
            if len(set(cycled)) < depth:  # a layer shared by two depths: fewer weights than ours
                raise utils.UserError(f"{path}: hparams {key}={ids!r} shares layers; not supported")
    return dict(
        num_text_tokens=int(hp['num_text_tokens']),
        text_seq_len=int(hp['text_seq_len']),
        dim=int(hp['dim']),
        depth=depth,
        heads=int(hp['heads']),
        dim_head=int(hp['dim_head']),
        attn_dropout=float(hp['attn_dropout']),
        ff_dropout=float(hp['ff_dropout']),
        loss_img_weight=float(hp['loss_img_weight']),
    )


def _dalle_pytorch_vae(obj, weights, path, vqgan_config_path):
    """The frozen image tokenizer of a DALLE-pytorch checkpoint: its DiscreteVAE (vae_params,
    weights 'vae.*'), or its VQGanVAE (no vae_params; taming's model.yaml needed for the
    architecture, the weights 'vae.model.*' in the checkpoint, the loss's dropped)."""
    name = obj.get('vae_class_name')
    if name is None:  # checkpoints before vae_class_name was saved
        name = (
            'DiscreteVAE'
            if obj['vae_params'] is not None
            else (
                'VQGanVAE'
                if any(k.startswith('vae.model.') for k in weights)
                else 'OpenAIDiscreteVAE'
            )
        )
    if name == 'DiscreteVAE':
        if obj['vae_params'] is None:
            raise utils.UserError(f"{path}: vae_class_name DiscreteVAE but no vae_params")
        vae = discrete_vae_from_hparams(obj['vae_params'], f"{path} vae_params")
        state = {k[4:]: v for k, v in weights.items() if k.startswith('vae.')}
    elif name == 'VQGanVAE':
        if not vqgan_config_path:
            raise utils.UserError(
                f"{path}: its VAE is a VQGAN (vae_class_name VQGanVAE); give its taming "
                "model.yaml as --vqgan_config_path (with --taming, as DALLE-pytorch)"
            )
        vae = VQGAN(*read_vqgan_config(vqgan_config_path))
        state = {
            k[10:]: v
            for k, v in weights.items()
            if k.startswith('vae.model.') and not k.startswith('vae.model.loss.')
        }
        stray = sorted(
            k for k in weights if k.startswith('vae.') and not k.startswith('vae.model.')
        )
        if stray:
            raise utils.UserError(f"{path}: weights key {stray[0]!r} maps to nothing in a VQGAN")
    else:
        raise utils.UserError(
            f"{path}: vae_class_name {name!r} is not supported (DiscreteVAE or VQGanVAE)"
        )
    _load_strict(vae, state, path, f"its 'vae.' weights do not fit its {name}")
    return vae


def load_dalle_pytorch(
    obj, path, device, tokenizer_kind='clip', tokenizer_path='', vqgan_config_path=''
):
    """DALLE, VAE and tokenizer from a DALLE-pytorch dalle.pt (already read with
    weights_only=True). Every DALLE weight maps onto models.DALLE (a name that does not, or a
    shape that differs, is an error naming it); T2I's copy (text2img, DALLE-pytorch 1.5.1) has
    one more text_pos_emb row, which its forward never reads (positions 0..text_seq_len), and
    is dropped. The checkpoint holds no tokenizer: DALLE-pytorch rebuilds it from the flags
    (default CLIP BPE with its raw ids, --chinese BERT WordPiece), so this one comes from
    tokenizer_kind/path and must have num_text_tokens ids."""
    weights = obj['weights']
    if isinstance(weights, str):
        raise utils.UserError(
            f"{path}: 'weights' is DeepSpeed's placeholder ({weights[:60]!r}...); consolidate "
            "the DeepSpeed checkpoint into a state dict first"
        )
    if not isinstance(weights, dict):
        raise utils.UserError(
            f"{path}: 'weights' is {type(weights).__name__}, expected a state dict"
        )
    kw = dalle_pytorch_hparams(obj['hparams'], path)
    if tokenizer_kind not in ('clip', 'chinese'):
        raise utils.UserError(
            f"TEXT.TOKENIZER={tokenizer_kind!r}: a DALLE-pytorch checkpoint was trained with its "
            "CLIP BPE (the default) or --chinese"
        )
    spec = {'kind': tokenizer_kind, 'path': tokenizer_path}
    if tokenizer_kind == 'clip':
        spec['shift'] = 0  # SimpleTokenizer's ids as they are (id 0 shares padding's id there)
    tokenizer = utils.DalleTokenizer(spec)
    if tokenizer.vocab_size != kw['num_text_tokens']:
        raise utils.UserError(
            f"{path}: hparams num_text_tokens={kw['num_text_tokens']}, but the {tokenizer_kind} "
            f"tokenizer ({tokenizer_path or 'default'}) has {tokenizer.vocab_size} ids; give the "
            "tokenizer it was trained with (--chinese, --bpe_path)"
        )
    vae = _dalle_pytorch_vae(obj, weights, path, vqgan_config_path)
    dalle = DALLE(num_image_tokens=vae.num_tokens, image_fmap_size=vae.fmap_size, **kw)
    ours = dalle.state_dict()
    state = {}
    for key, value in weights.items():
        if key.startswith('vae.'):
            continue
        name = dalle_pytorch_key(key)
        if name is None or name not in ours:
            raise utils.UserError(f"{path}: weights key {key!r} maps to no models.DALLE weight")
        want = tuple(ours[name].shape)
        expect = _dalle_pytorch_shape(name, want)
        if name == 'text_pos_emb.weight' and tuple(value.shape) == (want[0] + 1, want[1]):
            value = value[: want[0]]  # T2I's <bos><eos> row that no position reaches
        elif tuple(value.shape) != expect:
            raise utils.UserError(
                f"{path}: weights key {key!r} has shape {tuple(value.shape)}, expected {expect} "
                f"(hparams {kw}; VAE {vae.class_name}, a {vae.fmap_size}x{vae.fmap_size} grid of "
                f"{vae.num_tokens} tokens)"
            )
        state[name] = value.reshape(want)
    missing = sorted(set(ours) - set(state))
    if missing:
        raise utils.UserError(f"{path}: weights lack the DALLE-pytorch counterpart of {missing[0]}")
    dalle.load_state_dict(state)
    return (
        dalle.to(device),
        vae.to(device).eval().requires_grad_(False),
        tokenizer,
    )


def dalle_pytorch_optimizer_state(obj, dalle, opt, path):
    """DALLE-pytorch's opt_state (Adam over DALLE.parameters() without the VAE) in the order of
    `opt`'s parameters (dalle.parameters()), moments reshaped as the weights; the group keeps
    opt's own settings (fused, ...) with the saved lr, betas, eps, weight decay. None when the
    checkpoint has no optimizer state."""
    saved = obj.get('opt_state')
    if not saved:
        return None
    axial = '.' if any(k.startswith('image_pos_emb.weights.') for k in obj['weights']) else '_'
    theirs = dalle_pytorch_param_names(dalle.hparams['depth'], axial)
    groups = saved.get('param_groups', [])
    ids = [i for g in groups for i in g['params']]
    if len(groups) != 1 or len(ids) != len(theirs):
        raise utils.UserError(
            f"{path}: opt_state has {len(groups)} groups of {len(ids)} parameters; DALLE-pytorch's "
            f"Adam over this DALLE has one group of {len(theirs)}"
        )
    names = [n for n, _ in dalle.named_parameters()]
    params = dict(dalle.named_parameters())
    index = {n: j for j, n in enumerate(names)}
    state = {}
    for i, key in zip(ids, theirs):
        name = dalle_pytorch_key(key)
        if i in saved['state']:
            shape = params[name].shape
            state[index[name]] = {
                k: v.reshape(shape) if k in ('exp_avg', 'exp_avg_sq', 'max_exp_avg_sq') else v
                for k, v in saved['state'][i].items()
            }
    group = {k: v for k, v in opt.state_dict()['param_groups'][0].items()}
    group.update(
        {
            k: groups[0][k]
            for k in ('lr', 'betas', 'eps', 'weight_decay', 'amsgrad')
            if k in groups[0]
        }
    )
    group['params'] = list(range(len(names)))
    return {'state': state, 'param_groups': [group]}
