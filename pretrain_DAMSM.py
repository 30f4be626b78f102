"""pretrain_DAMSM.py: the text and image encoders that every generator here is conditioned on
(the image encoder is also half of R-precision).

One loop, three families (cfg MODEL.FAMILY; networks and losses in models.py, encoders section):
  damsm    AttnGAN's DAMSM: bi-LSTM text encoder + frozen Inception-v3, word and sentence losses
             python pretrain_DAMSM.py --cfg cfg/DAMSM/bird.yml --gpu 0        (coco.yml, shapes.yml)
  clip_hf  CLIP finetuned with the DAMSM losses + NT-Xent between two captions (T2I_CLIP-GAN)
             python pretrain_DAMSM.py --cfg cfg/DAMSM/clip_bird.yml --gpu 0   (clip_coco, clip_shapes)
  clip     CLIP from scratch on a CSV with open_clip's recipe (BriVL-Generation's first step)
             python pretrain_DAMSM.py --cfg cfg/clip_wukong_rn50.yml --gpu 0  (clip_shapes.yml)
Several GPUs: torchrun --nproc_per_node=N pretrain_DAMSM.py --cfg ... (losses on the global batch).

Each epoch: train and validation losses, retrieval R@1/5/10 both ways and R-precision on the
test split, word attention maps (log, TensorBoard, metrics.json with the scores' protocol);
text_encoder<N>.pth and image_encoder<N>.pth (N = epochs done) for main.py's TRAIN.NET_E;
--resume auto continues.
open_clip's checkpoints both ways (family clip): TRAIN.OPEN_CLIP_CHECKPOINT also writes its
epoch_<N>.pt beside them (open_clip_train main.py's layout: open_clip can --resume it), and
--resume takes an open_clip epoch_<N>.pt (or a bare open_clip state dict: weights only):
  python pretrain_DAMSM.py --cfg cfg/clip_wukong_rn50.yml --resume logs/RUN/checkpoints/epoch_10.pt
"""

import collections
import logging
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import utils

# AttnGAN's DAMSM (code/pretrain_DAMSM.py, code/cfg/DAMSM/bird.yml); cfgs say where they differ
DEFAULTS = {
    'CONFIG_NAME': 'DAMSM',
    'DATA_DIR': 'data/birds',  # AttnGAN layout (DATA.FORMAT attngan)
    'WORKERS': 1,
    'DATA': {
        'FORMAT': 'attngan',  # attngan | csv (open_clip's CsvDataset)
        'TRAIN_CSV': '',
        'VAL_CSV': '',
        'CSV_IMG_KEY': 'filepath',
        'CSV_CAPTION_KEY': 'title',
        'CSV_SEP': '\t',
        'CLASS_FROM': '',  # csv classes: '' = one per image, 'folder' = the image's folder
        'FLIP': True,  # AttnGAN's random horizontal flip of training images
        'CROP': True,  # attngan: AttnGAN's resize to 76/64 and random (test: central) crop
        # decode every image once; attngan: needs CROP and FLIP false; csv: one image size, and
        # open_clip's random crop is done on the batch
        'PRELOAD': False,
    },
    'TREE': {'BASE_SIZE': 299},  # training image side (DAMSM: BRANCH_NUM 1, 299)
    'TEXT': {'EMBEDDING_DIM': 256, 'CAPTIONS_PER_IMAGE': 10, 'WORDS_NUM': 18},
    'MODEL': {
        'FAMILY': 'damsm',  # damsm | clip_hf | clip
        'PRETRAINED': 'auto',  # damsm: Inception-v3 .pth ('auto' = torchvision's cache, '' = none);
        # clip_hf: hub name or folder ('' = random init, sizes from CLIP)
        'TOKENIZER': 'attngan',  # attngan | words | clip | bert
        'TOKENIZER_PATH': '',  # clip: hub name or folder; bert: vocab.txt, folder or hub name
        'KEEP_SPECIAL': False,  # transformers: keep start/end tokens among the word features
        'RNN': {'WORD_DIM': 300, 'DROPOUT': 0.5},
        'CNN': {
            'BACKBONE': 'inception_v3',
            'WIDTH': 32,
            'TRAIN_BACKBONE': False,
            'BN_STATS': 'adapt',
            'ALIGN_CORNERS': False,
        },  # AttnGAN pretrain_DAMSM.py runs cnn_model.train(): the frozen Inception's
        # BatchNorm uses batch statistics and updates its running ones; or 'frozen'.
        # ALIGN_CORNERS: the bilinear resize to 299 px, as AttnGAN code/model.py CNN_ENCODER's
        # nn.Upsample runs on today's PyTorch (False; True on PyTorch <= 0.3.1)
        'CLIP': {
            'VISION_LAYERS': [3, 4, 6, 3],
            'VISION_WIDTH': 64,
            'HEAD_WIDTH': 64,
            'PATCH_SIZE': 0,
            'TEXT_WIDTH': 512,
            'TEXT_HEADS': 8,
            'TEXT_LAYERS': 12,
        },
        'FINETUNE': ['all'],  # clip_hf: 'all', 'none' or CLIPModel parameter-name prefixes
    },
    'TRAIN': {
        'BATCH_SIZE': 48,
        'MAX_EPOCH': 600,
        'SNAPSHOT_INTERVAL': 50,
        'OPTIMIZER': 'adam',
        'BETAS': [0.5, 0.999],
        'EPS': 1e-8,
        'WEIGHT_DECAY': 0.0,
        'ENCODER_LR': 0.002,  # damsm, clip: every trainable weight
        'BACKBONE_LR': 2e-5,
        'LINEAR_LR': 0.002,  # clip_hf: pretrained CLIP weights / new heads
        'SCHEDULE': 'attngan',  # attngan | onecycle_epoch | cosine | constant
        'WARMUP': 0.1,  # cosine: share of all steps spent warming up
        'RESET_OPTIMIZER': True,  # AttnGAN builds a new Adam every epoch
        'RNN_GRAD_CLIP': 0.25,  # damsm: text encoder only; clip_hf, clip: all weights; 0 = off
        'AMP': False,  # CUDA only
        'OPEN_CLIP_CHECKPOINT': False,  # clip: also open_clip's epoch_<N>.pt beside text_encoder<N>.pth
        'SMOOTH': {'GAMMA1': 4.0, 'GAMMA2': 5.0, 'GAMMA3': 10.0, 'WORD_LOSS': 'attngan'},
        'LOG_EVERY': 50,
    },
    'LOSS': {
        'WORDS': 1.0,
        'SENT': 1.0,
        'NTXENT': 0.0,
        'NTXENT_TAU': 0.5,
        'CLIP': 0.0,
        'CLASS_MASK': True,
    },  # AttnGAN masks same-class pairs out of its two losses
    # NUM: test images used (0 = all); SWAP_WORDS: on the shapes captions, per attribute, the
    # share of test images closer to their caption than to it with that word swapped
    'EVAL': {'NUM': 0, 'R_NEG': 99, 'ATTN_IMAGES': 4, 'SWAP_WORDS': False},
}
CHOICES = {
    'DATA.FORMAT': ('attngan', 'csv'),
    'DATA.CLASS_FROM': ('', 'folder'),
    'MODEL.FAMILY': ('damsm', 'clip_hf', 'clip'),
    'MODEL.TOKENIZER': ('attngan', 'words', 'clip', 'bert'),
    'TRAIN.OPTIMIZER': ('adam', 'adamw'),
    'TRAIN.SCHEDULE': ('attngan', 'onecycle_epoch', 'cosine', 'constant'),
    'TRAIN.SMOOTH.WORD_LOSS': models.WORD_LOSS_FORMS,  # models.words_loss
}


def check_cfg(cfg):
    for key, allowed in CHOICES.items():
        value = cfg
        for part in key.split('.'):
            value = value[part]
        if value not in allowed:
            raise utils.UserError(
                f"{key}={value!r}: expected one of {', '.join(map(repr, allowed))}"
            )
    if cfg.MODEL.TOKENIZER == 'attngan' and cfg.MODEL.FAMILY != 'damsm':
        raise utils.UserError(
            f"MODEL.TOKENIZER=attngan has no start/end tokens to pool at; the "
            f"{cfg.MODEL.FAMILY} family takes words, clip or bert"
        )
    if not any(cfg.LOSS[k] > 0 for k in ('WORDS', 'SENT', 'NTXENT', 'CLIP')):
        raise utils.UserError("LOSS: WORDS, SENT, NTXENT and CLIP are all 0; nothing to train")
    if cfg.TRAIN.OPEN_CLIP_CHECKPOINT and (cfg.MODEL.FAMILY != 'clip' or cfg.LOSS.CLIP <= 0):
        raise utils.UserError(
            "TRAIN.OPEN_CLIP_CHECKPOINT needs MODEL.FAMILY clip and LOSS.CLIP > 0 (open_clip's "
            "CLIP has a logit_scale)"
        )
    if cfg.LOSS.NTXENT > 0 and cfg.DATA.FORMAT != 'attngan':
        raise utils.UserError("LOSS.NTXENT > 0 needs two captions per image: DATA.FORMAT attngan")


# ----------------------------------------------------------------------------------------------
# Data: AttnGAN layout (TextImageDataset) or open_clip's CSV; the test split, one item per image
# ----------------------------------------------------------------------------------------------
CROP_SCALE = (0.9, 1.0)  # open_clip transform.py: RandomResizedCrop's area share for training


def image_transforms(size, train):
    """open_clip's CSV transforms (open_clip transform.py image_transform) ending in [-1, 1];
    the encoders normalise."""
    from torchvision import transforms

    first = (
        [
            transforms.RandomResizedCrop(
                size, scale=CROP_SCALE, interpolation=transforms.InterpolationMode.BICUBIC
            )
        ]
        if train
        else [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
        ]
    )
    return transforms.Compose(
        first + [transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]
    )


class CSVTrainSet(torch.utils.data.Dataset):
    """open_clip's CsvDataset: one item per row (utils.PairDataset), plus the image's class.
    With preload each distinct image is decoded once, at twice the training side, and an item
    is its uint8 tensor: prepare_batch crops the batch (utils.random_resized_crop), because
    decoding and cropping one image at a time cost more than the small CLIP's step."""

    def __init__(self, pairs, classes, size, preload=False):
        self.pairs, self.classes = utils.PairDataset(pairs, image_transforms(size, True)), classes
        self.images, self.row_image = (
            utils.preload_images([p for p, _ in pairs], 2 * size) if preload else (None, None)
        )

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):  # (not preloaded) an unreadable image: the next row, class kept
        if self.images is not None:
            img, text = self.images[self.row_image[i]], self.pairs.pairs[i][1]
        else:
            img, text = self.pairs[i]
        return {'imgs': [img], 'text': text, 'class_id': self.classes[i]}


class EvalSet(torch.utils.data.Dataset):
    """The test split, one item per image: the image without augmentation, its first two
    captions (the first is the one retrieval and R-precision score), its class id."""

    def __init__(self, items, attngan_ds=None, size=None):
        self.items, self.ds = items, attngan_ds
        self.transform = image_transforms(size, False) if attngan_ds is None else None

    def __len__(self):
        return len(self.items)

    def image(self, key):
        return (
            self.ds.images(key)[0] if self.ds is not None else self.transform(utils.load_image(key))
        )

    def __getitem__(self, i):
        key, caps, cls = self.items[i]
        try:
            image = self.image(key)
        except utils.BadImage as e:  # left out of the scores (collate_eval), and counted
            return {'bad': str(e)}
        return {
            'image': image,
            'text': caps[0],
            'text2': caps[min(1, len(caps) - 1)],
            'class_id': cls,
        }


def collate_eval(items):
    """A test batch without its unreadable images; their messages in 'skipped'."""
    good = [it for it in items if 'bad' not in it]
    batch = torch.utils.data.default_collate(good) if good else {}
    batch['skipped'] = [it['bad'] for it in items if 'bad' in it]
    return batch


def class_ids_for(paths, mode):
    """CSV class ids: one per distinct image (AttnGAN's rule without class_info), or per folder."""
    names = [os.path.dirname(p) if mode == 'folder' else p for p in paths]
    index = {n: i for i, n in enumerate(sorted(set(names)))}
    return [index[n] for n in names]


def build_data(cfg):
    """-> training set, test EvalSet, vocabulary (AttnGAN's ixtoword order) for word tokenizers."""
    data_cfg, size, num = cfg.DATA, cfg.TREE.BASE_SIZE, cfg.EVAL.NUM
    if data_cfg.FORMAT == 'attngan':
        data = utils.AttnGANData(cfg.DATA_DIR, cfg.TEXT.CAPTIONS_PER_IMAGE)
        train = utils.TextImageDataset(
            data,
            'train',
            base_size=size,
            branch_num=1,
            words_num=cfg.TEXT.WORDS_NUM,
            train=True,
            two_captions=cfg.LOSS.NTXENT > 0,
            flip=data_cfg.FLIP,
            crop=data_cfg.CROP,
            preload=data_cfg.PRELOAD,
        )
        test = utils.TextImageDataset(
            data, 'test', base_size=size, branch_num=1, train=False, crop=data_cfg.CROP
        )
        cls = data.class_ids('test')
        keys = data.keys['test'][: num or None]
        evalset = EvalSet([(k, data.raw_captions(k)[:2], cls[i]) for i, k in enumerate(keys)], test)
        return train, evalset, [data.ixtoword[i] for i in range(len(data.ixtoword))]
    kw = dict(
        img_key=data_cfg.CSV_IMG_KEY, caption_key=data_cfg.CSV_CAPTION_KEY, sep=data_cfg.CSV_SEP
    )
    pairs = utils.read_csv_pairs(data_cfg.TRAIN_CSV, **kw)
    classes = class_ids_for([p for p, _ in pairs], data_cfg.CLASS_FROM)
    train = CSVTrainSet(pairs, classes, size, data_cfg.PRELOAD)
    grouped = collections.OrderedDict()
    for path, cap in utils.read_csv_pairs(data_cfg.VAL_CSV, **kw):
        grouped.setdefault(path, []).append(cap)
    paths = list(grouped)[: num or None]
    cls = class_ids_for(paths, data_cfg.CLASS_FROM)
    evalset = EvalSet([(p, grouped[p][:2], c) for p, c in zip(paths, cls)], size=size)
    words = []
    if cfg.MODEL.TOKENIZER in ('attngan', 'words'):
        ixtoword, _ = utils.build_vocab(utils.tokenize_attngan(c) for _, c in pairs)
        words = [ixtoword[i] for i in range(len(ixtoword))]
    return train, evalset, words


# ----------------------------------------------------------------------------------------------
# Model: the two encoders of the chosen family (models.py) and CLIP's temperature
# ----------------------------------------------------------------------------------------------
def hf_clip_config(cfg, tok_spec):
    """clip_hf: the hub/folder CLIPConfig, or a small random-init one sized by MODEL.CLIP."""
    from transformers import CLIPConfig

    model_cfg, clip_cfg = cfg.MODEL, cfg.MODEL.CLIP
    if model_cfg.PRETRAINED:
        try:
            return CLIPConfig.from_pretrained(model_cfg.PRETRAINED)
        except OSError as e:
            raise utils.UserError(
                f"MODEL.PRETRAINED={model_cfg.PRETRAINED!r}: no CLIP config offline "
                f"({str(e).splitlines()[0][:200]})"
            )
    if clip_cfg.PATCH_SIZE <= 0 or len(clip_cfg.VISION_LAYERS) != 1:
        raise utils.UserError(
            "MODEL.CLIP: a random-init clip_hf model is a ViT: PATCH_SIZE > 0 "
            "and VISION_LAYERS = [depth]"
        )
    embed_dim, tok = cfg.TEXT.EMBEDDING_DIM, models.TextEncoderTokenizer(tok_spec)
    return CLIPConfig(
        text_config=dict(
            vocab_size=len(tok_spec['vocab']),
            hidden_size=clip_cfg.TEXT_WIDTH,
            intermediate_size=4 * clip_cfg.TEXT_WIDTH,
            num_hidden_layers=clip_cfg.TEXT_LAYERS,
            num_attention_heads=clip_cfg.TEXT_HEADS,
            max_position_embeddings=cfg.TEXT.WORDS_NUM,
            projection_dim=embed_dim,
            bos_token_id=tok.sot,
            eos_token_id=tok.eot,
            pad_token_id=tok.pad_id,
        ),
        vision_config=dict(
            hidden_size=clip_cfg.VISION_WIDTH,
            intermediate_size=4 * clip_cfg.VISION_WIDTH,
            num_hidden_layers=clip_cfg.VISION_LAYERS[0],
            num_attention_heads=clip_cfg.VISION_WIDTH // clip_cfg.HEAD_WIDTH,
            image_size=cfg.TREE.BASE_SIZE,
            patch_size=clip_cfg.PATCH_SIZE,
            projection_dim=embed_dim,
        ),
        projection_dim=embed_dim,
    )


def build_encoders(cfg, words, log):
    """The text and image encoder specs of MODEL.FAMILY, the modules, pretrained weights."""
    model_cfg, clip_cfg, embed_dim = cfg.MODEL, cfg.MODEL.CLIP, cfg.TEXT.EMBEDDING_DIM
    tok = models.tokenizer_spec(
        model_cfg.TOKENIZER, cfg.TEXT.WORDS_NUM, model_cfg.TOKENIZER_PATH, words
    )
    if model_cfg.FAMILY == 'damsm':
        text = {
            'family': 'damsm',
            'dim': embed_dim,
            'tokenizer': tok,
            'word_dim': model_cfg.RNN.WORD_DIM,
            'dropout': model_cfg.RNN.DROPOUT,
        }
        image = {
            'family': 'damsm',
            'dim': embed_dim,
            'image_size': cfg.TREE.BASE_SIZE,
            'backbone': model_cfg.CNN.BACKBONE,
            'width': model_cfg.CNN.WIDTH,
            'train_backbone': model_cfg.CNN.TRAIN_BACKBONE,
            'bn_stats': model_cfg.CNN.BN_STATS,
            'align_corners': bool(model_cfg.CNN.ALIGN_CORNERS),
        }
        if model_cfg.CNN.BN_STATS not in ('adapt', 'frozen'):
            raise utils.UserError(
                f"MODEL.CNN.BN_STATS={model_cfg.CNN.BN_STATS!r}: expected adapt or frozen"
            )
    elif model_cfg.FAMILY == 'clip':
        text = {
            'family': 'clip',
            'dim': embed_dim,
            'tokenizer': tok,
            'width': clip_cfg.TEXT_WIDTH,
            'heads': clip_cfg.TEXT_HEADS,
            'layers': clip_cfg.TEXT_LAYERS,
            'keep_special': model_cfg.KEEP_SPECIAL,
        }
        image = {
            'family': 'clip',
            'dim': embed_dim,
            'image_size': cfg.TREE.BASE_SIZE,
            'layers': list(clip_cfg.VISION_LAYERS),
            'width': clip_cfg.VISION_WIDTH,
            'head_width': clip_cfg.HEAD_WIDTH,
            'patch_size': clip_cfg.PATCH_SIZE,
        }
    else:
        config = hf_clip_config(cfg, tok)
        tc, vc = config.text_config, config.vision_config
        if (
            not (tc.projection_dim == vc.projection_dim == embed_dim)
            or tc.vocab_size != len(tok['vocab'])
            or tc.max_position_embeddings < cfg.TEXT.WORDS_NUM
        ):
            raise utils.UserError(
                f"TEXT.EMBEDDING_DIM={embed_dim}, the tokenizer's {len(tok['vocab'])} ids and "
                f"TEXT.WORDS_NUM={cfg.TEXT.WORDS_NUM} must fit the CLIP model: projection_dim "
                f"{tc.projection_dim}, vocab_size {tc.vocab_size}, "
                f"{tc.max_position_embeddings} positions"
            )
        text = {
            'family': 'clip_hf',
            'dim': embed_dim,
            'tokenizer': tok,
            'keep_special': model_cfg.KEEP_SPECIAL,
            'config': config.text_config.to_dict(),
        }
        image = {'family': 'clip_hf', 'dim': embed_dim, 'config': config.vision_config.to_dict()}
    te, ie = models.build_text_encoder(text), models.build_image_encoder(image)
    if model_cfg.FAMILY == 'damsm' and model_cfg.CNN.BACKBONE == 'inception_v3':
        models.load_inception_weights(ie, model_cfg.PRETRAINED, log)
    if model_cfg.FAMILY == 'clip_hf':
        if model_cfg.PRETRAINED:
            from transformers import CLIPModel

            try:
                clip = CLIPModel.from_pretrained(model_cfg.PRETRAINED)
            except OSError as e:
                raise utils.UserError(
                    f"MODEL.PRETRAINED={model_cfg.PRETRAINED!r}: no CLIP weights offline "
                    f"({str(e).splitlines()[0][:200]})"
                )
            for ours, theirs in (
                (te.model.text_model, clip.text_model),
                (te.model.text_projection, clip.text_projection),
                (ie.model.vision_model, clip.vision_model),
                (ie.model.visual_projection, clip.visual_projection),
            ):
                ours.load_state_dict(theirs.state_dict())
            log.info(f"CLIP weights from {model_cfg.PRETRAINED}")
        set_finetune([te.model, ie.model], model_cfg.FINETUNE)
    return te, ie


def set_finetune(backbones, prefixes):
    """Which pretrained CLIP weights train: 'all' (T2I_CLIP-GAN), 'none', or prefixes of their
    CLIPModel names (e.g. text_model.encoder.layers.11, visual_projection). New heads always train."""
    named = [(n, p) for m in backbones for n, p in m.named_parameters()]
    for prefix in prefixes:
        if prefix not in ('all', 'none') and not any(n.startswith(prefix) for n, _ in named):
            raise utils.UserError(
                f"MODEL.FINETUNE: {prefix!r} matches no CLIP parameter "
                f"(e.g. {named[0][0]}, {named[-1][0]})"
            )
    for n, p in named:
        p.requires_grad_('all' in prefixes or any(n.startswith(x) for x in prefixes))


class DualEncoder(nn.Module):
    """Both encoders (and CLIP's learnable temperature, when its loss is on) as one module
    for DDP. Captions of one or two views go through the text encoder as one batch."""

    def __init__(self, text, image, logit_scale):
        super().__init__()
        self.text, self.image = text, image
        self.logit_scale = (
            nn.Parameter(torch.tensor(math.log(1 / 0.07))) if logit_scale else None
        )  # CLIP init

    def forward(self, images, ids, lengths, regions=True):
        reg, glob = self.image(images, regions=regions)
        words, sent, pad = self.text(ids, lengths)
        return reg, glob, words, sent, pad


def param_groups(model, cfg):
    """clip_hf: pretrained weights at BACKBONE_LR, new heads at LINEAR_LR (T2I_CLIP-GAN); else
    one ENCODER_LR. With weight decay, none on gains, biases and logit_scale (open_clip)."""
    train_cfg = cfg.TRAIN
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.MODEL.FAMILY == 'clip_hf':

        def is_backbone(n):
            return n.startswith(('text.model.', 'image.model.'))

        groups = [
            ('backbone', train_cfg.BACKBONE_LR, [(n, p) for n, p in named if is_backbone(n)]),
            ('head', train_cfg.LINEAR_LR, [(n, p) for n, p in named if not is_backbone(n)]),
        ]
    else:
        groups = [('encoder', train_cfg.ENCODER_LR, named)]
    out = []
    for name, lr, ps in groups:
        decay = [p for n, p in ps if p.ndim >= 2]
        rest = [p for n, p in ps if p.ndim < 2]
        for params, wd in (
            ((decay, train_cfg.WEIGHT_DECAY), (rest, 0.0))
            if train_cfg.WEIGHT_DECAY
            else ((decay + rest, 0.0),)
        ):
            if params:
                out.append(
                    {'params': params, 'lr': lr, 'base_lr': lr, 'name': name, 'weight_decay': wd}
                )
    return out


def build_optimizer(model, cfg):
    train_cfg = cfg.TRAIN
    opt = torch.optim.AdamW if train_cfg.OPTIMIZER == 'adamw' else torch.optim.Adam
    return opt(param_groups(model, cfg), betas=tuple(train_cfg.BETAS), eps=train_cfg.EPS)


def one_cycle(i, total, pct, div, final_div):
    """torch's OneCycleLR (cos, two phases) at step i, as a fraction of max_lr."""
    up, end = pct * total - 1, total - 1

    def cos(a, b, t):
        return b + (a - b) / 2 * (1 + math.cos(math.pi * t))

    if 0 < up and i <= up:
        return cos(1 / div, 1.0, i / up)
    return cos(1.0, 1 / div / final_div, min(1.0, (i - up) / (end - up)))


def lr_factor(cfg, group, step, epoch, steps_per_epoch):
    train_cfg = cfg.TRAIN
    if train_cfg.SCHEDULE == 'attngan':  # lr *= 0.98 after each epoch while lr > lr0 / 10
        f = 1.0
        for _ in range(epoch):
            f = f * 0.98 if f > 0.1 else f
        return f
    if (
        train_cfg.SCHEDULE == 'onecycle_epoch'
    ):  # T2I_CLIP-GAN: OneCycleLR sized in batches, stepped per epoch
        pct, div, final_div = (0.02, 25.0, 1e4) if group != 'head' else (0.1, 1e3, 1e6)
        return one_cycle(epoch, steps_per_epoch * train_cfg.MAX_EPOCH, pct, div, final_div)
    if (
        train_cfg.SCHEDULE == 'cosine'
    ):  # open_clip's cosine_lr: linear warmup, cosine to 0, per step
        total = steps_per_epoch * train_cfg.MAX_EPOCH
        warm = max(1, int(train_cfg.WARMUP * total))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return 1.0


# ----------------------------------------------------------------------------------------------
# Losses on the global batch
# ----------------------------------------------------------------------------------------------
def prepare_batch(raw, tokenizer, cfg, device, crop_generator=None):
    """A loader batch -> images, [(ids, lengths) per caption view], class ids, on device.
    Preloaded training images (CSVTrainSet, uint8) get open_clip's random crop here, drawn from
    crop_generator."""
    images = (raw['imgs'][0] if 'imgs' in raw else raw['image']).to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = utils.random_resized_crop(
            images, cfg.TREE.BASE_SIZE, CROP_SCALE, generator=crop_generator
        )
    caps = []
    for sfx in ('', '2') if cfg.LOSS.NTXENT > 0 else ('',):
        if tokenizer.kind == 'attngan' and 'caption' + sfx in raw:
            ids, lengths = raw['caption' + sfx], raw['cap_len' + sfx]  # AttnGAN's own ids
        else:
            ids, lengths = tokenizer(raw['text' + sfx])
        caps.append((ids.to(device), torch.as_tensor(lengths).to(device)))
    return images, caps, torch.as_tensor(raw['class_id']).to(device)


def encode(model, images, caps, regions):
    """-> regions, global, [(words, sent, pad) per caption view]."""
    reg, glob, words, sent, pad = model(
        images, torch.cat([c[0] for c in caps]), torch.cat([c[1] for c in caps]), regions
    )
    n = len(images)
    return (
        reg,
        glob,
        [(words[i : i + n], sent[i : i + n], pad[i : i + n]) for i in range(0, len(sent), n)],
    )


def _identity(x):
    return x


def _fp32(x):
    """Losses in float32 at least (AMP's float16 features are cast up)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def compute_losses(feats, class_ids, cfg, logit_scale=None, world=1, gather=_identity):
    """The weighted objective. Under DDP each rank computes it on the gathered global batch
    (its own shard keeps the gradient); the caller multiplies it by the world size, so DDP's
    gradient average is exactly the global loss's gradient. Returns (loss, values, maps)."""
    loss_cfg, smooth_cfg = cfg.LOSS, cfg.TRAIN.SMOOTH
    regions, img, views = feats
    cls = gather(class_ids) if loss_cfg.CLASS_MASK else None
    img = gather(_fp32(img))
    reg = gather(_fp32(regions)) if loss_cfg.WORDS else None
    terms, sents, maps = collections.defaultdict(int), [], []
    for words, sent, pad in views:  # T2I_CLIP-GAN: both DAMSM losses for each caption view
        sent = gather(_fp32(sent))
        sents.append(sent)
        if loss_cfg.WORDS:
            if world > 1:  # equal shapes on every rank for the gather
                extra = cfg.TEXT.WORDS_NUM - words.shape[2]
                words, pad = F.pad(words, (0, extra)), F.pad(pad, (0, extra), value=True)
            w0, w1, m = models.words_loss(
                reg,
                gather(_fp32(words)),
                gather(pad.to(torch.uint8)).bool(),
                cls,
                smooth_cfg.GAMMA1,
                smooth_cfg.GAMMA2,
                smooth_cfg.GAMMA3,
                smooth_cfg.WORD_LOSS,
            )
            terms['w_loss0'] += w0
            terms['w_loss1'] += w1
            maps = maps or m
        if loss_cfg.SENT:
            s0, s1 = models.sent_loss(img, sent, cls, smooth_cfg.GAMMA3)
            terms['s_loss0'] += s0
            terms['s_loss1'] += s1
    if loss_cfg.NTXENT:
        terms['nt_xent'] = models.nt_xent_loss(sents[0], sents[1], loss_cfg.NTXENT_TAU)
    if loss_cfg.CLIP:
        # the temperature is one shared weight, not a shard: keep its gradient at 1x after the x world
        scale = logit_scale / world + (logit_scale * (1 - 1 / world)).detach()
        terms['clip'] = models.clip_loss(img, sents[0], scale)
    weight = {
        'w_loss0': loss_cfg.WORDS,
        'w_loss1': loss_cfg.WORDS,
        's_loss0': loss_cfg.SENT,
        's_loss1': loss_cfg.SENT,
        'nt_xent': loss_cfg.NTXENT,
        'clip': loss_cfg.CLIP,
    }
    total = sum(weight[k] * v for k, v in terms.items())
    values = {k: float(v.detach()) for k, v in terms.items()}
    values['loss'] = float(total.detach())
    return total, values, maps


# ----------------------------------------------------------------------------------------------
# Evaluation: validation losses, retrieval, R-precision, attention maps
# ----------------------------------------------------------------------------------------------
def retrieval(img, txt, ks=(1, 5, 10), chunk=1024):
    """Recall@K both ways over the test split's cosine matrix, pair i the truth (open_clip)."""
    img, txt = F.normalize(img.double(), dim=1), F.normalize(txt.double(), dim=1)
    ranks = {'i2t': [], 't2i': []}
    for s in range(0, len(img), chunk):
        for name, a, b in (('i2t', img, txt), ('t2i', txt, img)):
            sim = a[s : s + chunk] @ b.t()
            true = sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))]
            ranks[name].append((sim > true[:, None]).sum(1))
    out = {}
    for name, r in ranks.items():
        r = torch.cat(r)
        out.update({f'{name}_R@{k}': float((r < k).double().mean()) for k in ks})
    return out


def attention_panels(images, maps, word_lists, size=96, max_words=10):
    """AttnGAN's build_super_images, simply: per image a row of the image and each word's
    attention over it, the word written on its panel. Returns panels in [-1, 1], row length."""
    from PIL import Image, ImageDraw

    rows = []
    for img, att, words in zip(images, maps, word_lists):
        base = (
            F.interpolate(img[None].float().cpu(), size=(size, size), mode='bilinear')[0] + 1
        ) / 2
        row = [base]
        for j, word in enumerate(words[:max_words]):
            a = F.interpolate(att[j][None, None].float().cpu(), size=(size, size), mode='bilinear')[
                0
            ]
            a = (a - a.min()) / (a.max() - a.min() + 1e-8)
            panel = base * (0.2 + 0.8 * a)  # attended regions bright, the rest dimmed
            pil = Image.fromarray((panel.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
            ImageDraw.Draw(pil).text((2, 2), word, fill=(255, 255, 255))
            row.append(torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255)
        rows += row + [torch.zeros_like(base)] * (max_words + 1 - len(row))
    return torch.stack(rows) * 2 - 1, max_words + 1


# R-precision's negatives and the swapped words are drawn from one fixed seed (utils' default), so
# every epoch is scored on the same draws.
EVAL_SEED = 0


@torch.no_grad()
def evaluate(model, loader, cfg, device):
    """Validation losses on the test batches; retrieval and R-precision with the first caption
    of each test image; the word attention maps of the first few. Rank 0 only."""
    model.eval()
    sums, n, imgs, sents, classes, panels = collections.defaultdict(float), 0, [], [], [], None
    texts = []
    skipped = []
    for raw in loader:
        skipped += raw.pop('skipped')
        if 'image' not in raw:
            continue
        images, caps, cls = prepare_batch(raw, model.text.tokenizer, cfg, device)
        feats = encode(model, images, caps, regions=cfg.LOSS.WORDS > 0)
        imgs.append(feats[1].float().cpu())
        sents.append(feats[2][0][1].float().cpu())
        classes.append(cls.cpu())
        texts += raw['text']
        if len(images) < 2:
            continue
        _, values, maps = compute_losses(feats, cls, cfg, model.logit_scale)
        for k, v in values.items():
            sums[k] += v
        n += 1
        if panels is None and cfg.EVAL.ATTN_IMAGES and maps:
            n_attn = cfg.EVAL.ATTN_IMAGES
            panels = attention_panels(
                images[:n_attn],
                maps[:n_attn],
                [model.text.word_strings(t) for t in raw['text'][:n_attn]],
            )
    for msg in skipped:
        logging.getLogger('t2i').warning(f"test image not scored: {msg}")
    if not imgs:
        raise utils.UserError(f"no readable test image among the {len(skipped)} of the evaluation")
    img, txt, cls = torch.cat(imgs), torch.cat(sents), torch.cat(classes).numpy()
    metrics = {f'val_{k}': v / max(n, 1) for k, v in sums.items()}
    metrics['eval_images'], metrics['eval_images_unreadable'] = len(img), len(skipped)
    metrics.update(retrieval(img, txt))
    metrics['R_precision'], metrics['R_precision_std'] = utils.r_precision(
        img, txt, cls, n_neg=cfg.EVAL.R_NEG, seed=EVAL_SEED
    )
    if cfg.EVAL.SWAP_WORDS:
        metrics.update(utils.swap_accuracy(img, model.text, texts, seed=EVAL_SEED))
    model.train()
    return metrics, panels


def eval_protocol(cfg, num_images, weights):
    """utils.protocol of evaluate's scores: the test images as build_data's EvalSet prepares
    them, EVAL_SEED, and `weights`, the files holding the encoders scored."""
    size = cfg.TREE.BASE_SIZE
    if cfg.DATA.FORMAT == 'attngan':  # AttnGAN's test transform (utils.TextImageDataset)
        split = 'test'
        resize = (
            f'resize to {int(size * 76 / 64)} px, centre crop'
            if cfg.DATA.CROP
            else f'resize to {size} px'
        )
    else:  # open_clip's validation transform (image_transforms)
        split, resize = cfg.DATA.VAL_CSV, f'bicubic resize to {size} px, centre crop'
    return utils.protocol(split, num_images, EVAL_SEED, size, resize, weights)


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------
def save_encoders(run, model, epoch, step):
    """text_encoder<epoch>.pth and image_encoder<epoch>.pth, each with the spec that rebuilds it;
    returns their paths by kind."""
    return {
        kind: utils.save_checkpoint(
            run.out,
            kind,
            step,
            models={kind: module},
            epoch=epoch,
            cfg=run.cfg,
            extra={'spec': module.spec},
            keep=0,
            name=f'{kind}{epoch}.pth',
        )
        for kind, module in (('text_encoder', model.text), ('image_encoder', model.image))
    }


def resume_open_clip(obj, path, model, opt, scaler, steps_per_epoch, cfg, log):
    """An open_clip checkpoint into the clip family's DualEncoder, as open_clip's --resume
    takes it: with 'epoch', the weights, AdamW's state and the scaler, training going on after
    that epoch (its step count, which it does not save, = epoch x steps per epoch, as its
    schedule counts); a bare state dict: the weights, from epoch 0. Returns (step, epoch)."""
    if cfg.MODEL.FAMILY != 'clip':
        raise utils.UserError(
            f"{path}: an open_clip checkpoint; it loads into MODEL.FAMILY clip, not "
            f"{cfg.MODEL.FAMILY}"
        )
    full = 'state_dict' in obj and 'epoch' in obj
    sd = obj['state_dict'] if 'state_dict' in obj else obj
    model.load_state_dict(models.from_open_clip_state_dict(sd, model.state_dict(), path))
    if not full:
        log.info(f"open_clip weights from {path}; training starts at epoch 0")
        return 0, 0
    epoch = int(obj['epoch'])
    if obj.get('optimizer'):
        opt.load_state_dict(models.open_clip_optimizer_state(obj['optimizer'], model, opt, path))
    if obj.get('scaler') and scaler.is_enabled():
        scaler.load_state_dict(obj['scaler'])
    log.info(
        f"resuming open_clip checkpoint {path} ({obj.get('name', '')}): after epoch {epoch}, "
        f"optimizer {'restored' if obj.get('optimizer') else 'new'}"
    )
    return epoch * steps_per_epoch, epoch


def save_open_clip(run, model, opt, scaler, epoch):
    """<run>/checkpoints/epoch_<epoch>.pt in open_clip_train's layout (rank 0)."""
    if not run.main:
        return None
    path = os.path.join(run.out, 'checkpoints', f'epoch_{epoch}.pt')
    ckpt = models.to_open_clip_checkpoint(
        model, opt, epoch, run.cfg.CONFIG_NAME, scaler, ddp=run.world > 1
    )
    utils.atomic_torch_save(ckpt, path)
    return path


def train_epoch(ddp, model, loader, opt, amp, scaler, cfg, run, epoch, step):
    train_cfg = cfg.TRAIN
    clip_params = [
        p
        for p in (model.text if cfg.MODEL.FAMILY == 'damsm' else model).parameters()
        if p.requires_grad
    ]
    regions = cfg.LOSS.WORDS > 0 or cfg.MODEL.FAMILY != 'clip'  # every weight in the graph, for DDP
    sums, n = collections.defaultdict(float), 0
    bar = utils.progress(loader, desc=f'epoch {epoch}', every=train_cfg.LOG_EVERY, log=run.log)
    # preloaded images' crops: one stream per rank and epoch, so a resumed epoch draws the same
    crop_generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([cfg.SEED, run.rank, epoch]).generate_state(1)[0])
    )
    for raw in bar:
        for g in opt.param_groups:
            g['lr'] = g['base_lr'] * lr_factor(cfg, g['name'], step, epoch, len(loader))
        images, caps, cls = prepare_batch(
            raw, model.text.tokenizer, cfg, run.device, crop_generator
        )
        with amp:
            feats = encode(ddp, images, caps, regions)
        loss, values, _ = compute_losses(
            feats, cls, cfg, model.logit_scale, run.world, utils.all_gather_with_grad
        )
        utils.check_finite(loss, 'DAMSM/CLIP total', step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss * run.world).backward()
        if train_cfg.RNN_GRAD_CLIP > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(clip_params, train_cfg.RNN_GRAD_CLIP)
        scaler.step(opt)
        scaler.update()
        if model.logit_scale is not None:  # CLIP: the temperature stays within [1, 100]
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        step += 1
        for k, v in values.items():
            sums[k] += v
        n += 1
        bar.set_postfix(**{k: v for k, v in values.items() if k == 'loss'})
        if step % train_cfg.LOG_EVERY == 0:
            for k, v in values.items():
                run.writer.add_scalar(f'train_step/{k}', v, step)
            for g in opt.param_groups:
                run.writer.add_scalar(f"lr/{g['name']}", g['lr'], step)
    return step, {f'train_{k}': utils.all_reduce_mean(v / max(n, 1)) for k, v in sums.items()}


# open_clip's training flags (open_clip src/training/params.py), as cfg keys (utils.flags_to_set);
# --train-data also selects the CSV reader, --model the preset below.
OPEN_CLIP_FLAGS = {
    'train_data': 'DATA.TRAIN_CSV',
    'val_data': 'DATA.VAL_CSV',
    'csv_img_key': 'DATA.CSV_IMG_KEY',
    'csv_caption_key': 'DATA.CSV_CAPTION_KEY',
    'csv_separator': 'DATA.CSV_SEP',
    'batch_size': 'TRAIN.BATCH_SIZE',
    'lr': 'TRAIN.ENCODER_LR',
    'wd': 'TRAIN.WEIGHT_DECAY',
    'epochs': 'TRAIN.MAX_EPOCH',
    'workers': 'WORKERS',
    'save_frequency': 'TRAIN.SNAPSHOT_INTERVAL',
}
# open_clip model_configs/RN50.json: ModifiedResNet [3, 4, 6, 3] width 64, 224 px, embed_dim 1024,
# a 12-layer 512-wide text transformer with 8 heads.
OPEN_CLIP_MODELS = {
    'RN50': [
        'MODEL.FAMILY=clip',
        'MODEL.CLIP.VISION_LAYERS=[3, 4, 6, 3]',
        'MODEL.CLIP.VISION_WIDTH=64',
        'MODEL.CLIP.HEAD_WIDTH=64',
        'MODEL.CLIP.PATCH_SIZE=0',
        'MODEL.CLIP.TEXT_WIDTH=512',
        'MODEL.CLIP.TEXT_HEADS=8',
        'MODEL.CLIP.TEXT_LAYERS=12',
        'TEXT.EMBEDDING_DIM=1024',
        'TREE.BASE_SIZE=224',
    ]
}


def parse_args(argv=None):
    p = utils.base_parser('Pretrain the text/image encoders (DAMSM, CLIP + DAMSM, CLIP).')
    g = p.add_argument_group("open_clip's flags (CLIP from scratch on a CSV)")
    for flag, key in OPEN_CLIP_FLAGS.items():
        typ = (
            float
            if flag in ('lr', 'wd')
            else int
            if flag in ('batch_size', 'epochs', 'workers', 'save_frequency')
            else str
        )
        g.add_argument(
            '--' + flag.replace('_', '-'), dest=flag, type=typ, default=None, help=f'cfg {key}'
        )
    g.add_argument(
        '--model', default=None, help=f"open_clip model config: {', '.join(OPEN_CLIP_MODELS)}"
    )
    g.add_argument(
        '--report-to',
        dest='report_to',
        default=None,
        help='accepted: TensorBoard is always written to <run dir>/tb',
    )
    g.add_argument(
        '--horovod', action='store_true', help='accepted: data-parallel runs use torchrun instead'
    )
    args = p.parse_args(argv)
    preset = []
    if args.model is not None:
        if args.model not in OPEN_CLIP_MODELS:
            raise utils.UserError(
                f"--model {args.model}: expected one of {sorted(OPEN_CLIP_MODELS)}"
            )
        preset = OPEN_CLIP_MODELS[args.model]
    if args.train_data is not None:
        preset = ['DATA.FORMAT=csv'] + preset
    args = utils.flags_to_set(args, OPEN_CLIP_FLAGS)
    args.set = preset + args.set
    args.open_clip_notes = (
        [f"--report-to {args.report_to}: TensorBoard scalars go to <run dir>/tb"]
        if args.report_to
        else []
    ) + (
        ["--horovod: ignored; run data-parallel with torchrun --nproc_per_node=N"]
        if args.horovod
        else []
    )
    return args


def main():
    args = parse_args()
    run = utils.setup(args, DEFAULTS)
    for note in args.open_clip_notes:
        run.log.info(note)
    cfg, log, device = run.cfg, run.log, run.device
    check_cfg(cfg)

    train_set, eval_set, words = build_data(cfg)
    utils.check_r_precision_negatives(
        [c for *_, c in eval_set.items],
        cfg.EVAL.R_NEG,
        f'R-precision on the {len(eval_set)} test images (EVAL.R_NEG)',
    )
    text, image = build_encoders(cfg, words, log)
    model = DualEncoder(text, image, cfg.LOSS.CLIP > 0).to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        f"{cfg.MODEL.FAMILY}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{n_train:,} trained | {len(train_set)} training items, {len(eval_set)} test images"
    )
    opt = build_optimizer(model, cfg)
    amp, scaler = utils.autocast(device, cfg.TRAIN.AMP, torch.float16, cuda_only=True)
    # AMP off: a disabled scaler, whose scale, unscale_ and step pass through (one form of step)
    scaler = scaler or torch.amp.GradScaler('cuda', enabled=False)
    if cfg.TRAIN.AMP and device.type != 'cuda':
        log.info("TRAIN.AMP is for CUDA; training in float32 on the CPU")
    loader = utils.make_loader(
        train_set,
        cfg.TRAIN.BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        workers=cfg.WORKERS,
        seed=cfg.SEED,
    )
    if len(loader) == 0:
        raise utils.UserError(
            f"{len(train_set)} training items per rank give no batch of "
            f"TRAIN.BATCH_SIZE={cfg.TRAIN.BATCH_SIZE}"
        )
    step, start = 0, 0
    ckpt, foreign = utils.read_resume(args.resume, run, 'damsm', models.is_open_clip_checkpoint)
    if ckpt:
        step, start = utils.restore_checkpoint(ckpt, {'model': model}, {'opt': opt}, scaler=scaler)
    elif foreign is not None:
        step, start = resume_open_clip(
            foreign, args.resume, model, opt, scaler, len(loader), cfg, log
        )
    ddp = utils.wrap_ddp(model, device)
    eval_loader = torch.utils.data.DataLoader(
        eval_set, batch_size=cfg.TRAIN.BATCH_SIZE, num_workers=cfg.WORKERS, collate_fn=collate_eval
    )

    for epoch in range(start, cfg.TRAIN.MAX_EPOCH):
        utils.set_epoch(loader, epoch)
        if cfg.TRAIN.RESET_OPTIMIZER:
            opt.state.clear()
        step, metrics = train_epoch(ddp, model, loader, opt, amp, scaler, cfg, run, epoch, step)
        if run.main:
            val, panels = evaluate(model, eval_loader, cfg, device)
            metrics.update(val, epoch=epoch + 1, step=step)
            log.info(
                f"| end epoch {epoch + 1:3d} | train loss {metrics['train_loss']:.3f} | valid loss "
                f"{metrics.get('val_loss', float('nan')):.3f} | R@1 i2t {metrics['i2t_R@1']:.3f} "
                f"t2i {metrics['t2i_R@1']:.3f} | R-precision {metrics['R_precision']:.3f} "
                f"± {metrics['R_precision_std']:.3f}"
                + ''.join(
                    f" | swap {a} {metrics[f'swap_{a}']:.3f}"
                    for a in utils.ATTRIBUTES
                    if f'swap_{a}' in metrics
                )
            )
            for k, v in metrics.items():
                if k not in ('epoch', 'step'):
                    run.writer.add_scalar(f"{'loss' if 'loss' in k else 'eval'}/{k}", v, epoch + 1)
            if panels is not None:
                utils.log_images(run.writer, 'attention_maps', panels[0], epoch + 1, nrow=panels[1])
                utils.save_image_grid(
                    panels[0], os.path.join(run.out, 'attention_maps.png'), nrow=panels[1]
                )
        weights = {}
        if (epoch + 1) % cfg.TRAIN.SNAPSHOT_INTERVAL == 0 or epoch + 1 == cfg.TRAIN.MAX_EPOCH:
            weights = save_encoders(run, model, epoch + 1, step)
            if cfg.TRAIN.OPEN_CLIP_CHECKPOINT:
                save_open_clip(run, model, opt, scaler, epoch + 1)
        weights['checkpoint'] = utils.save_checkpoint(
            run.out,
            'damsm',
            step,
            models={'model': model},
            optimizers={'opt': opt},
            scaler=scaler,
            epoch=epoch + 1,
            cfg=cfg,
        )
        if run.main:  # after the files: the protocol names those holding the weights scored
            protocol = eval_protocol(cfg, metrics['eval_images'], weights)
            utils.write_metrics(run.out, {**metrics, 'protocol': protocol})
    log.info(f"done: {run.out}/checkpoints/text_encoder{cfg.TRAIN.MAX_EPOCH}.pth (TRAIN.NET_E)")


if __name__ == '__main__':
    utils.run_main(main)
