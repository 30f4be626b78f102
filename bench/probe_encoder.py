"""What of a caption a text encoder passes on: probes of its sentence features on the shapes data.

    python bench/probe_encoder.py output/clip_shapes/checkpoints/text_encoder3.pth [more ...]

For each encoder (a text_encoder<N>.pth of pretrain_DAMSM.py, its image encoder beside it), on the
captions of single-object images: a linear classifier trained on the sentence features of 2,000
training captions predicts the object's shape, colour, size and cell for 1,000 test captions
(chance 0.17 / 0.13 / 0.50 / 0.11), and the swap accuracy of utils.swap_accuracy on the first
caption of each test image (own caption against the word swapped, chance 0.5), and the share
of the training features' variance each attribute's class means explain (how faint a direction
it is for the first linear layer that reads them). A generator conditioned on the sentence
features can only draw what they carry.

    python bench/probe_encoder.py ENCODER --generator output/shapes_DMGAN/checkpoints/dmgan_<step>.pt

also probes what reaches DM-GAN's initial stage through that checkpoint's conditioning
augmentation (its G_ema, run on ENCODER's sentence features): the mean mu and one draw
c = mu + sigma * eps (StackGAN Sec. 3.1), the only text the 4x4 -> base_size stage sees,
and what its discriminators tell apart: per stage, how often D's conditional logit scores a
real test image higher with its own first caption than with that caption's shape, colour or
size word swapped (the swap pairs above; chance 0.5). What D cannot tell apart, the
adversarial loss does not ask of G.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import models  # noqa: E402
import utils  # noqa: E402

TARGETS = ('shape', 'colour', 'size', 'cell')


def single_object_captions(data_dir, split, n_images, attributes):
    """(caption, {target: class index}) for the first two captions of the first n_images
    single-object images of a split."""
    captions = {}
    with open(os.path.join(data_dir, f'{split}.jsonl')) as f:
        for line in f:
            row = json.loads(line)
            captions.setdefault(utils.shapes_key(row['image_path']), []).append(row['sentences'])
    out = []
    for key in [k for k in captions if len(attributes[k]['objects']) == 1][:n_images]:
        o = attributes[key]['objects'][0]
        labels = {
            'shape': utils.SHAPES.index(o['shape']),
            'colour': list(utils.COLOURS).index(o['colour']),
            'size': list(utils.SIZES).index(o['size']),
            'cell': o['cell'],
        }
        out += [(c, labels) for c in captions[key][:2]]
    return out


def linear_probe(x_train, y_train, x_test, y_test, steps=500, seed=0):
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    head = torch.nn.Linear(x_train.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return float((head(x_test).argmax(1) == y_test).float().mean())


def probe_targets(x_train, x_test, train, test):
    """The linear probe's test accuracy for each of TARGETS."""
    return [
        linear_probe(
            x_train,
            torch.tensor([y[t] for _, y in train]),
            x_test,
            torch.tensor([y[t] for _, y in test]),
        )
        for t in TARGETS
    ]


def variance_shares(x, labels):
    """For each of TARGETS, the share of the features' variance that its class means explain
    (between-class over total): how loud that attribute is among the directions a generator's
    first linear layer reads."""
    x = x.float() - x.float().mean(0)
    total = x.pow(2).sum(1).mean()
    shares = []
    for t in TARGETS:
        y = torch.tensor([lab[t] for _, lab in labels])
        means = torch.zeros(int(y.max()) + 1, x.shape[1]).index_add_(0, y, x)
        means /= torch.bincount(y, minlength=len(means)).clamp(min=1)[:, None].float()
        shares.append(float(means[y].pow(2).sum(1).mean() / total))
    return shares


def first_captions(data_dir, n_images):
    """The first caption and image of the first n_images test images, images in [-1, 1] at 64 px."""
    rows, seen = [], set()
    with open(os.path.join(data_dir, 'test.jsonl')) as f:
        for line in f:
            row = json.loads(line)
            if row['image_path'] not in seen and len(seen) < n_images:
                seen.add(row['image_path'])
                rows.append(row)
    images = torch.stack(
        [
            torch.from_numpy(
                np.asarray(
                    utils.load_image(os.path.join(data_dir, r['image_path'])).resize((64, 64)),
                    dtype=np.float32,
                )
                / 127.5
                - 1
            ).permute(2, 0, 1)
            for r in rows
        ]
    )
    return [r['sentences'] for r in rows], images


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('encoders', nargs='+', help='text_encoder<N>.pth files (or run dirs)')
    p.add_argument('--data', default='data/shapes', help='the shapes dataset')
    p.add_argument('--train_images', type=int, default=1000)
    p.add_argument('--test_images', type=int, default=500)
    p.add_argument('--generator', help="a main.py dmgan_<step>.pt trained on the first encoder")
    args = p.parse_args()
    attributes = utils.caption_attributes(args.data)
    train = single_object_captions(args.data, 'train', args.train_images, attributes)
    test = single_object_captions(args.data, 'test', args.test_images, attributes)
    swap_texts, swap_images = first_captions(args.data, 1000)
    print(f'{len(train)} training / {len(test)} test captions of single-object images')
    print(
        '| encoder | '
        + ' | '.join(f'probe {t}' for t in TARGETS)
        + ' | swap shape | swap colour | swap size |'
    )
    print('|---' * (len(TARGETS) + 4) + '|')
    shares = {}
    for path in args.encoders:
        text_encoder, image_encoder = models.load_encoders(path)
        x_train, x_test = (
            utils.encode_sentences(text_encoder, [c for c, _ in s]) for s in (train, test)
        )
        probes = probe_targets(x_train, x_test, train, test)
        shares[path] = variance_shares(x_train, train)
        with torch.no_grad():
            image_emb = torch.cat(
                [image_encoder.encode(b)[1].float() for b in torch.split(swap_images, 250)]
            )
        swap = utils.swap_accuracy(image_emb, text_encoder, swap_texts)
        print(
            f'| {path} | '
            + ' | '.join(f'{v:.3f}' for v in probes)
            + ' | '
            + ' | '.join(f"{swap.get(f'swap_{a}', float('nan')):.3f}" for a in utils.ATTRIBUTES)
            + ' |'
        )
        if args.generator and path == args.encoders[0]:
            probe_conditioning(args.generator, x_train, x_test, train, test)
            probe_discriminators(args.generator, text_encoder, swap_texts, swap_images)
    print('\nShare of the sentence features\' variance explained by each attribute\'s class means')
    print('| encoder | ' + ' | '.join(TARGETS) + ' |\n' + '|---' * (len(TARGETS) + 1) + '|')
    for path, v in shares.items():
        print(f'| {path} | ' + ' | '.join(f'{a:.3f}' for a in v) + ' |')


def probe_conditioning(path, x_train, x_test, train, test):
    """The probes on the conditioning augmentation's mu and on one draw c of it."""
    ckpt = utils.load_checkpoint(path, 'dmgan')
    netG = models.build_dmgan_generator(utils.to_cfg(ckpt['cfg']), x_train.shape[1])
    netG.load_state_dict(ckpt['models']['G_ema'])
    torch.manual_seed(0)
    with torch.no_grad():
        (c_train, mu_train, logvar), (c_test, mu_test, _) = (
            netG.ca_net(x) for x in (x_train, x_test)
        )
    sigma = torch.exp(0.5 * logvar).mean().item()
    for name, a, b in (('mu', mu_train, mu_test), ('c = mu + sigma * eps', c_train, c_test)):
        probes = probe_targets(a, b, train, test)
        print(f'| {path}: {name} | ' + ' | '.join(f'{v:.3f}' for v in probes) + ' | | | |')
    print(f"mean |mu| {mu_train.abs().mean().item():.3f}, mean sigma {sigma:.3f}")


@torch.no_grad()
def probe_discriminators(path, text_encoder, captions, images):
    """Per D stage: own caption against each swapped one, as utils.swap_accuracy does for an
    encoder, scored by the conditional logit."""
    ckpt = utils.load_checkpoint(path, 'dmgan')
    cfg = utils.to_cfg(ckpt['cfg'])
    rows = [
        (i, a, text)
        for i, cap in enumerate(captions)
        for a, text in utils.swapped_captions(cap, i).items()
    ]
    own = utils.encode_sentences(text_encoder, list(captions))
    other = utils.encode_sentences(text_encoder, [t for *_, t in rows])
    index = torch.tensor([i for i, *_ in rows])
    for stage in range(cfg.TREE.BRANCH_NUM):
        size = cfg.TREE.BASE_SIZE * 2**stage
        netD = models.DMGANDiscriminator(
            size,
            cfg.GAN.DF_DIM,
            own.shape[1],
            condition=cfg.GAN.get('D_CONDITION', 'concat'),
            word_regions='word_regions.weight_bar' in ckpt['models'][f'D{stage}'],
        )
        netD.load_state_dict(ckpt['models'][f'D{stage}'])
        netD.eval()
        x = F.interpolate(images, size=(size, size), mode='bilinear', antialias=True)
        codes = netD(x)
        wins = netD.cond(codes[index], own[index]) > netD.cond(codes[index], other)
        swap = {
            a: wins[[k for k, (_, b, _) in enumerate(rows) if b == a]].float().mean().item()
            for a in utils.ATTRIBUTES
        }
        print(
            f'| {path}: D{stage} ({size} px) | '
            + ' | ' * len(TARGETS)
            + ' | '.join(f'{swap[a]:.3f}' for a in utils.ATTRIBUTES)
            + ' |'
        )


if __name__ == '__main__':
    utils.run_main(main)
