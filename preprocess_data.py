"""Data preparation. One script, three tasks picked by cfg TASK:

  shapes  the embedded synthetic dataset (coloured shapes with captions) in the
          AttnGAN/CUB layout, plus CSV, jsonl and COCO-json views of it
          python preprocess_data.py --cfg cfg/preprocess/shapes.yml
  embed   caption embeddings for XMC-GAN (BERT, or a project text encoder)   [not implemented yet]
  filter  the Wukong-style caption/image filter for the DALLE pipeline       [not implemented yet]
"""
import json
import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw

import utils

DEFAULTS = {
    'TASK': 'shapes',
    'SHAPES': {
        'OUT_DIR': 'data/shapes',
        'NUM_TRAIN': 10000,
        'NUM_TEST': 1000,
        'IMAGE_SIZE': 128,
        'SEED': 0,              # dataset seed, independent of the run SEED
        'P_TWO_OBJECTS': 0.3,   # share of images with two objects
        'CAPTIONS_PER_IMAGE': 10,
        'JPEG_QUALITY': 95,
    },
}

# ----------------------------------------------------------------------------
# The synthetic world: attributes, drawing, captions
# ----------------------------------------------------------------------------
SHAPES = ['circle', 'square', 'triangle', 'diamond', 'star', 'cross']
COLOURS = {'red': (220, 30, 30), 'orange': (245, 140, 20), 'yellow': (240, 220, 30),
           'green': (40, 170, 60), 'cyan': (30, 200, 210), 'blue': (30, 70, 220),
           'purple': (140, 50, 190), 'pink': (245, 120, 190)}
BACKGROUNDS = {'white': (235, 235, 235), 'gray': (128, 128, 128), 'black': (25, 25, 25),
               'beige': (225, 210, 180)}
SIZES = {'small': 0.12, 'large': 0.21}        # radius as a share of the image side
CELLS = [(r, c) for r in range(3) for c in range(3)]   # 3x3 grid, reading order
CLASSES = [f'{c}_{s}' for c in COLOURS for s in SHAPES]  # class = first object's colour+shape

SYN = {
    'large': ['large', 'big'], 'small': ['small', 'little', 'tiny'],
    'circle': ['circle', 'disc', 'round circle'], 'square': ['square', 'box shape'],
    'triangle': ['triangle'], 'diamond': ['diamond', 'rhombus'], 'star': ['star', 'five-pointed star'],
    'cross': ['cross', 'plus sign'],
}
CELL_PHRASES = {
    (0, 0): ['in the top left corner', 'at the upper left'], (0, 1): ['at the top', 'near the top'],
    (0, 2): ['in the top right corner', 'at the upper right'], (1, 0): ['on the left', 'at the left side'],
    (1, 1): ['in the center', 'in the middle'], (1, 2): ['on the right', 'at the right side'],
    (2, 0): ['in the bottom left corner', 'at the lower left'], (2, 1): ['at the bottom', 'near the bottom'],
    (2, 2): ['in the bottom right corner', 'at the lower right'],
}
INVERSE = {'to the left of': 'to the right of', 'to the right of': 'to the left of',
           'above': 'below', 'below': 'above'}


def polygon(shape, cx, cy, r):
    if shape == 'square':
        a = r / math.sqrt(2)
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == 'diamond':
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == 'triangle':
        return [(cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a)))
                for a in (90, 210, 330)]
    if shape == 'star':
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(math.radians(90 + 36 * i)),
                 cy - (r if i % 2 == 0 else 0.45 * r) * math.sin(math.radians(90 + 36 * i)))
                for i in range(10)]
    if shape == 'cross':
        a, b = r, r / 3
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
                (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
                (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def sample_scene(rng, p_two):
    """Objects (reading order), their relation and the background."""
    n = 2 if rng.random() < p_two else 1
    for _ in range(100):
        cells = sorted(rng.sample(range(9), n))
        objs = []
        for cell in cells:
            size = rng.choice(list(SIZES))
            r = SIZES[size]
            row, col = CELLS[cell]
            cx = min(max((col + 0.5) / 3 + rng.uniform(-0.04, 0.04), r + 0.01), 0.99 - r)
            cy = min(max((row + 0.5) / 3 + rng.uniform(-0.04, 0.04), r + 0.01), 0.99 - r)
            objs.append({'shape': rng.choice(SHAPES), 'colour': rng.choice(list(COLOURS)),
                         'size': size, 'cell': cell, 'cx': round(cx, 4), 'cy': round(cy, 4),
                         'r': r})
        if n == 1 or math.hypot(objs[0]['cx'] - objs[1]['cx'], objs[0]['cy'] - objs[1]['cy']) \
                > objs[0]['r'] + objs[1]['r'] + 0.03:
            break
    relation = None
    if n == 2:
        dx, dy = objs[1]['cx'] - objs[0]['cx'], objs[1]['cy'] - objs[0]['cy']
        relation = ('to the left of' if dx > 0 else 'to the right of') if abs(dx) >= abs(dy) \
            else ('above' if dy > 0 else 'below')   # relation of object 1 to object 2
    return {'objects': objs, 'relation': relation, 'background': rng.choice(list(BACKGROUNDS))}


def render(scene, size, rng):
    """Draw at 2x and downsample (anti-aliasing); background with a soft gradient and noise."""
    s2 = size * 2
    bg = np.array(BACKGROUNDS[scene['background']], np.float32)
    grad = np.linspace(-12, 12, s2, dtype=np.float32)[:, None, None] * rng.choice([-1, 1])
    arr = np.clip(bg[None, None] + grad + np.zeros((s2, s2, 3), np.float32), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in scene['objects']:
        col = tuple(int(np.clip(v + rng.randint(-15, 15), 0, 255)) for v in COLOURS[o['colour']])
        cx, cy, r = o['cx'] * s2, o['cy'] * s2, o['r'] * s2
        if o['shape'] == 'circle':
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        else:
            draw.polygon(polygon(o['shape'], cx, cy, r), fill=col)
    img = img.reduce(2)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def captions(scene, n, rng):
    """n distinct captions naming every object's size, colour and shape, its position
    (one object) or the relation between the two, in varied wording and word order."""
    objs, bg = scene['objects'], scene['background']
    w = lambda k: rng.choice(SYN.get(k, [k]))     # noqa: E731 (a synonym)
    out, tries = [], 0
    while len(out) < n and tries < 500:
        tries += 1
        if len(objs) == 1:
            o = objs[0]
            S, C, SH, P = w(o['size']), o['colour'], w(o['shape']), rng.choice(CELL_PHRASES[CELLS[o['cell']]])
            t = rng.choice([
                f'a {S} {C} {SH} {P}.', f'{P}, there is a {S} {C} {SH}.', f'a {C} {SH} {P}. it is {S}.',
                f'this image shows a {S} {SH} that is {C}, {P}.', f'the {SH} {P} is {C} and {S}.',
                f'a picture of a {S} {C} {SH} placed {P} on a {bg} background.', f'{S} {C} {SH} {P}',
                f'there is a {C} {SH} {P}, and it is {S}.', f'on a {bg} background, a {S} {C} {SH} sits {P}.',
                f'a {S} {SH} colored {C} {P}.'])
        else:
            a, b, rel = objs[0], objs[1], scene['relation']
            np1 = f"{w(a['size'])} {a['colour']} {w(a['shape'])}"
            np2 = f"{w(b['size'])} {b['colour']} {w(b['shape'])}"
            t = rng.choice([
                f'a {np1} {rel} a {np2}.', f'a {np2} {INVERSE[rel]} a {np1}.',
                f"there is a {np1} and a {np2}; the {a['colour']} one is {rel} the {b['colour']} one.",
                f'two shapes: a {np1} {rel} a {np2}.', f'a {np1} {rel} a {np2}, on a {bg} background.',
                f'on a {bg} background, a {np2} is {INVERSE[rel]} a {np1}.',
                f'the picture has a {np1} and, {INVERSE[rel]} it, a {np2}.'])
        if t not in out:
            out.append(t)
    while len(out) < n:                 # very few wordings possible: repeat, still n lines
        out.append(out[len(out) % max(1, len(out))])
    return out


def make_shapes(c, log):
    """Write the dataset in the CUB layout AttnGAN reads, plus CSV/jsonl/COCO views."""
    rng = random.Random(c.SEED)
    root = c.OUT_DIR
    img_root = os.path.join(root, 'CUB_200_2011', 'images')
    done = os.path.join(root, 'DONE.json')
    want = {'NUM_TRAIN': c.NUM_TRAIN, 'NUM_TEST': c.NUM_TEST, 'IMAGE_SIZE': c.IMAGE_SIZE,
            'SEED': c.SEED, 'P_TWO_OBJECTS': c.P_TWO_OBJECTS, 'CAPTIONS_PER_IMAGE': c.CAPTIONS_PER_IMAGE}
    if os.path.isfile(done):
        with open(done) as f:
            have = json.load(f)
        if have == want:
            log.info(f'{root}: already generated with these settings; nothing to do')
            return
        raise utils.UserError(f'{root}: holds a dataset generated with other settings {have}; '
                              'choose another SHAPES.OUT_DIR or delete it')
    splits, attrs, images_txt, bbox_txt = {'train': [], 'test': []}, {}, [], []
    counts = {}
    total = c.NUM_TRAIN + c.NUM_TEST
    bar = utils.progress(range(total), desc='shapes', every=1000, log=log)
    for i in bar:
        split = 'train' if i < c.NUM_TRAIN else 'test'
        scene = sample_scene(rng, c.P_TWO_OBJECTS)
        first = scene['objects'][0]
        cls = CLASSES.index(f"{first['colour']}_{first['shape']}") + 1
        counts[cls] = counts.get(cls, 0) + 1
        key = f"{cls:03d}.{first['colour']}_{first['shape']}/{first['colour']}_{first['shape']}_{i:05d}"
        os.makedirs(os.path.join(img_root, os.path.dirname(key)), exist_ok=True)
        os.makedirs(os.path.join(root, 'text', os.path.dirname(key)), exist_ok=True)
        render(scene, c.IMAGE_SIZE, rng).save(os.path.join(img_root, key + '.jpg'), quality=c.JPEG_QUALITY)
        caps = captions(scene, c.CAPTIONS_PER_IMAGE, rng)
        with open(os.path.join(root, 'text', key + '.txt'), 'w') as f:
            f.write('\n'.join(caps) + '\n')
        images_txt.append(f'{i + 1} {key}.jpg')
        # The box is the whole image, so AttnGAN's bird crop keeps every object and position.
        bbox_txt.append(f'{i + 1} 0.0 0.0 {c.IMAGE_SIZE}.0 {c.IMAGE_SIZE}.0')
        splits[split].append((key, cls, caps))
        attrs[key] = {**scene, 'class_id': cls, 'split': split}
    for name, lines in (('images.txt', images_txt), ('bounding_boxes.txt', bbox_txt)):
        with open(os.path.join(root, 'CUB_200_2011', name), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    for split, items in splits.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        utils.safe_pickle_dump([k for k, _, _ in items], os.path.join(root, split, 'filenames.pickle'))
        utils.safe_pickle_dump([cl for _, cl, _ in items], os.path.join(root, split, 'class_info.pickle'))
        write_views(root, split, items)
    with open(os.path.join(root, 'attributes.json'), 'w') as f:
        json.dump(attrs, f)
    with open(os.path.join(root, 'classes.txt'), 'w') as f:
        f.write('\n'.join(f'{i + 1} {n}' for i, n in enumerate(CLASSES)) + '\n')
    utils.atomic_write_text(done, json.dumps(want))
    log.info(f'{root}: {c.NUM_TRAIN} train + {c.NUM_TEST} test images of {c.IMAGE_SIZE}px, '
             f'{c.CAPTIONS_PER_IMAGE} captions each, {len(counts)} classes')


def write_views(root, split, items):
    """The same images as an open_clip CSV (tab, filepath/title), DALLE jsonl lines
    and a COCO-style captions json; image paths relative to each file's folder."""
    rel = lambda k: os.path.join('CUB_200_2011', 'images', k + '.jpg')   # noqa: E731
    with open(os.path.join(root, f'{split}.csv'), 'w') as f:
        f.write('filepath\ttitle\n')
        f.writelines(f'{rel(k)}\t{cap}\n' for k, _, caps in items for cap in caps)
    with open(os.path.join(root, f'{split}.jsonl'), 'w') as f:
        f.writelines(json.dumps({'image_path': rel(k), 'sentences': cap}) + '\n'
                     for k, _, caps in items for cap in caps)
    images, anns = [], []
    for n, (k, _, caps) in enumerate(items):
        images.append({'id': n, 'file_name': k + '.jpg'})
        anns += [{'id': len(anns) + j, 'image_id': n, 'caption': cap} for j, cap in enumerate(caps)]
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    with open(os.path.join(root, 'annotations', f'captions_{split}.json'), 'w') as f:
        json.dump({'images': images, 'annotations': anns}, f)


def summarize(root, log):
    """What `make demo` prints: the files written and one example."""
    attrs = json.load(open(os.path.join(root, 'attributes.json')))
    key = next(iter(attrs))
    caps = open(os.path.join(root, 'text', key + '.txt')).read().splitlines()
    log.info(f'{root}: {sum(1 for a in attrs.values() if a["split"] == "train")} train / '
             f'{sum(1 for a in attrs.values() if a["split"] == "test")} test images')
    for name in ('CUB_200_2011/images', 'text', 'train/filenames.pickle', 'test/filenames.pickle',
                 'captions.pickle', 'attributes.json', 'train.csv', 'train.jsonl',
                 'annotations/captions_train.json'):
        log.info(f'  {name}{"" if os.path.exists(os.path.join(root, name)) else "  (written on first read)"}')
    log.info(f'example {key}: {attrs[key]["objects"]}')
    for cap in caps[:3]:
        log.info(f'  "{cap}"')


def main():
    args = utils.base_parser(__doc__.splitlines()[0]).parse_args()
    run = utils.setup(args, DEFAULTS, tensorboard=False)
    cfg = run.cfg
    if cfg.TASK == 'shapes':
        make_shapes(cfg.SHAPES, run.log)
        utils.AttnGANData(cfg.SHAPES.OUT_DIR, cfg.SHAPES.CAPTIONS_PER_IMAGE)  # builds captions.pickle
        summarize(cfg.SHAPES.OUT_DIR, run.log)
        utils.write_metrics(run.out, {'dataset': cfg.SHAPES.OUT_DIR, 'num_train': cfg.SHAPES.NUM_TRAIN,
                                      'num_test': cfg.SHAPES.NUM_TEST})
    elif cfg.TASK in ('embed', 'filter'):
        raise utils.UserError(f"TASK={cfg.TASK}: not implemented yet (see the XMC-GAN / DALLE issues)")
    else:
        raise utils.UserError(f"TASK={cfg.TASK!r}: expected one of shapes, embed, filter")


if __name__ == '__main__':
    utils.run_main(main)
