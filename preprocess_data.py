"""Data preparation. One script, three tasks picked by cfg TASK:

shapes  the embedded synthetic dataset (coloured shapes with captions) in the
        AttnGAN/CUB layout, plus CSV, jsonl and COCO-json views of it
        python preprocess_data.py --cfg cfg/preprocess/shapes.yml
embed   caption embeddings for XMC-GAN (BERT, or a project text encoder)
        python preprocess_data.py --cfg cfg/preprocess/coco_bert.yml [--gpu 0]
filter  the Wukong-style caption/image filter of text2img over a local CSV of (image, caption):
        CLIP CSVs and DALLE jsonl, 9:1 split
        python preprocess_data.py --cfg cfg/preprocess/wukong_food.yml
"""

import json
import math
import os
import random
import re

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
        'SEED': 0,  # dataset seed, independent of the run SEED
        'P_TWO_OBJECTS': 0.3,  # share of images with two objects
        'CAPTIONS_PER_IMAGE': 10,
        'JPEG_QUALITY': 95,
    },
    'EMBED': {  # XMC-GAN's caption embeddings (its preprocess_data.py)
        'SOURCE': 'coco',  # 'coco': official captions json; 'attngan': the AttnGAN/CUB layout
        'DATA_DIR': 'data/coco',
        'SPLITS': {
            'train': 'train2014',
            'test': 'val2014',
        },  # coco: captions_<v>.json + <v>/ images
        'CAPTIONS_PER_IMAGE': 10,  # attngan only: the dataset's captions per image
        'MAX_CAPTIONS': 5,  # captions kept per image (0 = all); the original keeps COCO's first 5
        'ENCODER': 'bert-base-uncased',  # transformers hub name or folder, or a text_encoder<N>.pth
        'MAX_LEN': 17,  # tokens, [CLS] and [SEP] included
        'BATCH_SIZE': 256,
        'SHARD_SIZE': 8192,  # captions per shard file
        'OUT_DIR': 'data/coco/xmc_bert',
    },
    'FILTER': {  # text2img form_data/dealData_wukong.ipynb
        'INPUT_CSV': 'data/wukong/data.csv',  # local images: columns IMG_KEY, CAPTION_KEY
        'IMG_KEY': 'filepath',
        'CAPTION_KEY': 'caption',
        'SEP': ',',
        'KEYWORDS': 'data/wukong/foodNames.txt',  # one keyword a line
        'MAX_CAPTION_LEN': 32,  # characters
        'FORBIDDEN': '[\\d？【】《》\\:\\?<>"]',  # regex: digits and these marks
        'MAX_PIECE_LEN': 18,  # longest piece between ; , or whitespace
        'KEYWORD_MAX_LEN': 6,  # substrings up to this long are looked up in KEYWORDS
        'MAX_ASPECT': 3.0,  # long side / short side
        'MIN_SIDE': 32,  # pixels, both sides (the original's w*w > 1000 checked the width twice)
        'VAL_FRACTION': 0.1,
        'SPLIT_SEED': 0,  # the original: df.sample(frac=0.9, random_state=0)
        'OUT_DIR': 'data/wukong',
    },
}

# ----------------------------------------------------------------------------
# The synthetic world: attributes, drawing, captions
# ----------------------------------------------------------------------------
# Shapes, colours (RGB) and sizes are utils.SHAPES / COLOURS / SIZES: the judge reads the same vocabulary.
BACKGROUNDS = {
    'white': (235, 235, 235),
    'gray': (128, 128, 128),
    'black': (25, 25, 25),
    'beige': (225, 210, 180),
}
CELLS = [(row, col) for row in range(3) for col in range(3)]  # 3x3 grid, reading order
CLASSES = [
    f'{colour}_{shape}' for colour in utils.COLOURS for shape in utils.SHAPES
]  # class = first object's colour+shape

SYN = {
    'large': ['large', 'big'],
    'small': ['small', 'little', 'tiny'],
    'circle': ['circle', 'disc', 'round circle'],
    'square': ['square', 'box shape'],
    'triangle': ['triangle'],
    'diamond': ['diamond', 'rhombus'],
    'star': ['star', 'five-pointed star'],
    'cross': ['cross', 'plus sign'],
}
CELL_PHRASES = {
    (0, 0): ['in the top left corner', 'at the upper left'],
    (0, 1): ['at the top', 'near the top'],
    (0, 2): ['in the top right corner', 'at the upper right'],
    (1, 0): ['on the left', 'at the left side'],
    (1, 1): ['in the center', 'in the middle'],
    (1, 2): ['on the right', 'at the right side'],
    (2, 0): ['in the bottom left corner', 'at the lower left'],
    (2, 1): ['at the bottom', 'near the bottom'],
    (2, 2): ['in the bottom right corner', 'at the lower right'],
}
INVERSE = {
    'to the left of': 'to the right of',
    'to the right of': 'to the left of',
    'above': 'below',
    'below': 'above',
}


def polygon(shape, cx, cy, r):
    if shape == 'square':
        a = r / math.sqrt(2)
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == 'diamond':
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == 'triangle':
        return [
            (cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a)))
            for a in (90, 210, 330)
        ]
    if shape == 'star':
        return [
            (
                cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(math.radians(90 + 36 * i)),
                cy - (r if i % 2 == 0 else 0.45 * r) * math.sin(math.radians(90 + 36 * i)),
            )
            for i in range(10)
        ]
    if shape == 'cross':
        a, b = r, r / 3
        return [
            (cx - b, cy - a),
            (cx + b, cy - a),
            (cx + b, cy - b),
            (cx + a, cy - b),
            (cx + a, cy + b),
            (cx + b, cy + b),
            (cx + b, cy + a),
            (cx - b, cy + a),
            (cx - b, cy + b),
            (cx - a, cy + b),
            (cx - a, cy - b),
            (cx - b, cy - b),
        ]
    raise ValueError(shape)


def sample_scene(rng, p_two):
    """Objects (reading order), their relation and the background."""
    n = 2 if rng.random() < p_two else 1
    for _ in range(100):
        cells = sorted(rng.sample(range(9), n))
        objs = []
        for cell in cells:
            size = rng.choice(list(utils.SIZES))
            r = utils.SIZES[size]
            row, col = CELLS[cell]
            cx = min(max((col + 0.5) / 3 + rng.uniform(-0.04, 0.04), r + 0.01), 0.99 - r)
            cy = min(max((row + 0.5) / 3 + rng.uniform(-0.04, 0.04), r + 0.01), 0.99 - r)
            objs.append(
                {
                    'shape': rng.choice(utils.SHAPES),
                    'colour': rng.choice(list(utils.COLOURS)),
                    'size': size,
                    'cell': cell,
                    'cx': round(cx, 4),
                    'cy': round(cy, 4),
                    'r': r,
                }
            )
        if (
            n == 1
            or math.hypot(objs[0]['cx'] - objs[1]['cx'], objs[0]['cy'] - objs[1]['cy'])
            > objs[0]['r'] + objs[1]['r'] + 0.03
        ):
            break
    relation = None
    if n == 2:
        dx, dy = objs[1]['cx'] - objs[0]['cx'], objs[1]['cy'] - objs[0]['cy']
        relation = (
            ('to the left of' if dx > 0 else 'to the right of')
            if abs(dx) >= abs(dy)
            else ('above' if dy > 0 else 'below')
        )  # relation of object 1 to object 2
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
        col = tuple(
            int(np.clip(v + rng.randint(-15, 15), 0, 255)) for v in utils.COLOURS[o['colour']]
        )
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

    def w(k):
        """A synonym of k."""
        return rng.choice(SYN.get(k, [k]))

    out, tries = [], 0
    while len(out) < n and tries < 500:
        tries += 1
        if len(objs) == 1:
            o = objs[0]
            S, C, SH, P = (
                w(o['size']),
                o['colour'],
                w(o['shape']),
                rng.choice(CELL_PHRASES[CELLS[o['cell']]]),
            )
            t = rng.choice(
                [
                    f'a {S} {C} {SH} {P}.',
                    f'{P}, there is a {S} {C} {SH}.',
                    f'a {C} {SH} {P}. it is {S}.',
                    f'this image shows a {S} {SH} that is {C}, {P}.',
                    f'the {SH} {P} is {C} and {S}.',
                    f'a picture of a {S} {C} {SH} placed {P} on a {bg} background.',
                    f'{S} {C} {SH} {P}',
                    f'there is a {C} {SH} {P}, and it is {S}.',
                    f'on a {bg} background, a {S} {C} {SH} sits {P}.',
                    f'a {S} {SH} colored {C} {P}.',
                ]
            )
        else:
            a, b, rel = objs[0], objs[1], scene['relation']
            np1 = f"{w(a['size'])} {a['colour']} {w(a['shape'])}"
            np2 = f"{w(b['size'])} {b['colour']} {w(b['shape'])}"
            t = rng.choice(
                [
                    f'a {np1} {rel} a {np2}.',
                    f'a {np2} {INVERSE[rel]} a {np1}.',
                    f"there is a {np1} and a {np2}; the {a['colour']} one is {rel} the {b['colour']} one.",
                    f'two shapes: a {np1} {rel} a {np2}.',
                    f'a {np1} {rel} a {np2}, on a {bg} background.',
                    f'on a {bg} background, a {np2} is {INVERSE[rel]} a {np1}.',
                    f'the picture has a {np1} and, {INVERSE[rel]} it, a {np2}.',
                ]
            )
        if t not in out:
            out.append(t)
    while len(out) < n:  # very few wordings possible: repeat, still n lines
        out.append(out[len(out) % max(1, len(out))])
    return out


def make_shapes(shapes_cfg, log):
    """Write the dataset in the CUB layout AttnGAN reads, plus CSV/jsonl/COCO views."""
    rng = random.Random(shapes_cfg.SEED)
    root = shapes_cfg.OUT_DIR
    img_root = os.path.join(root, 'CUB_200_2011', 'images')
    done = os.path.join(root, 'DONE.json')
    want = {
        'NUM_TRAIN': shapes_cfg.NUM_TRAIN,
        'NUM_TEST': shapes_cfg.NUM_TEST,
        'IMAGE_SIZE': shapes_cfg.IMAGE_SIZE,
        'SEED': shapes_cfg.SEED,
        'P_TWO_OBJECTS': shapes_cfg.P_TWO_OBJECTS,
        'CAPTIONS_PER_IMAGE': shapes_cfg.CAPTIONS_PER_IMAGE,
    }
    if os.path.isfile(done):
        with open(done) as f:
            have = json.load(f)
        if have == want:
            log.info(f'{root}: already generated with these settings; nothing to do')
            return
        raise utils.UserError(
            f'{root}: holds a dataset generated with other settings {have}; '
            'choose another SHAPES.OUT_DIR or delete it'
        )
    splits, attrs, images_txt, bbox_txt = {'train': [], 'test': []}, {}, [], []
    counts = {}
    total = shapes_cfg.NUM_TRAIN + shapes_cfg.NUM_TEST
    bar = utils.progress(range(total), desc='shapes', every=1000, log=log)
    for i in bar:
        split = 'train' if i < shapes_cfg.NUM_TRAIN else 'test'
        scene = sample_scene(rng, shapes_cfg.P_TWO_OBJECTS)
        first = scene['objects'][0]
        cls = CLASSES.index(f"{first['colour']}_{first['shape']}") + 1
        counts[cls] = counts.get(cls, 0) + 1
        key = f"{cls:03d}.{first['colour']}_{first['shape']}/{first['colour']}_{first['shape']}_{i:05d}"
        os.makedirs(os.path.join(img_root, os.path.dirname(key)), exist_ok=True)
        os.makedirs(os.path.join(root, 'text', os.path.dirname(key)), exist_ok=True)
        render(scene, shapes_cfg.IMAGE_SIZE, rng).save(
            os.path.join(img_root, key + '.jpg'), quality=shapes_cfg.JPEG_QUALITY
        )
        caps = captions(scene, shapes_cfg.CAPTIONS_PER_IMAGE, rng)
        with open(os.path.join(root, 'text', key + '.txt'), 'w') as f:
            f.write('\n'.join(caps) + '\n')
        images_txt.append(f'{i + 1} {key}.jpg')
        # The box is the whole image, so AttnGAN's bird crop keeps every object and position.
        bbox_txt.append(f'{i + 1} 0.0 0.0 {shapes_cfg.IMAGE_SIZE}.0 {shapes_cfg.IMAGE_SIZE}.0')
        splits[split].append((key, cls, caps))
        attrs[key] = {**scene, 'class_id': cls, 'split': split}
    for name, lines in (('images.txt', images_txt), ('bounding_boxes.txt', bbox_txt)):
        with open(os.path.join(root, 'CUB_200_2011', name), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    for split, items in splits.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        utils.safe_pickle_dump(
            [k for k, _, _ in items], os.path.join(root, split, 'filenames.pickle')
        )
        utils.safe_pickle_dump(
            [cl for _, cl, _ in items], os.path.join(root, split, 'class_info.pickle')
        )
        write_views(root, split, items)
    with open(os.path.join(root, 'attributes.json'), 'w') as f:
        json.dump(attrs, f)
    with open(os.path.join(root, 'classes.txt'), 'w') as f:
        f.write('\n'.join(f'{i + 1} {n}' for i, n in enumerate(CLASSES)) + '\n')
    utils.atomic_write_text(done, json.dumps(want))
    log.info(
        f'{root}: {shapes_cfg.NUM_TRAIN} train + {shapes_cfg.NUM_TEST} test images of '
        f'{shapes_cfg.IMAGE_SIZE}px, {shapes_cfg.CAPTIONS_PER_IMAGE} captions each, '
        f'{len(counts)} classes'
    )


def write_views(root, split, items):
    """The same images as an open_clip CSV (tab, filepath/title), DALLE jsonl lines
    and a COCO-style captions json; image paths relative to each file's folder."""

    def rel(k):
        return os.path.join('CUB_200_2011', 'images', k + '.jpg')

    with open(os.path.join(root, f'{split}.csv'), 'w') as f:
        f.write('filepath\ttitle\n')
        f.writelines(f'{rel(k)}\t{cap}\n' for k, _, caps in items for cap in caps)
    with open(os.path.join(root, f'{split}.jsonl'), 'w') as f:
        f.writelines(
            json.dumps({'image_path': rel(k), 'sentences': cap}) + '\n'
            for k, _, caps in items
            for cap in caps
        )
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
    log.info(
        f'{root}: {sum(1 for a in attrs.values() if a["split"] == "train")} train / '
        f'{sum(1 for a in attrs.values() if a["split"] == "test")} test images'
    )
    for name in (
        'CUB_200_2011/images',
        'text',
        'train/filenames.pickle',
        'test/filenames.pickle',
        'captions.pickle',
        'attributes.json',
        'train.csv',
        'train.jsonl',
        'annotations/captions_train.json',
    ):
        log.info(
            f'  {name}{"" if os.path.exists(os.path.join(root, name)) else "  (written on first read)"}'
        )
    log.info(f'example {key}: {attrs[key]["objects"]}')
    for cap in caps[:3]:
        log.info(f'  "{cap}"')


# ----------------------------------------------------------------------------
# XMC-GAN caption embeddings: per-token features and sentence vectors, fp16 shards
# ----------------------------------------------------------------------------
def caption_table(embed_cfg, split):
    """One split's images [[key, image path, class id, first caption row, n captions]] and
    captions [(key, caption index, text)], in image order."""
    src = embed_cfg.SPLITS[split]
    if embed_cfg.SOURCE == 'coco':
        pairs = utils.read_coco_json(
            os.path.join(embed_cfg.DATA_DIR, 'annotations', f'captions_{src}.json'),
            os.path.join(embed_cfg.DATA_DIR, src),
        )
        # COCO has no classes: every image is its own (R-precision's "other classes")
        items = [
            (os.path.splitext(os.path.basename(p))[0], p, i, caps)
            for i, (p, caps) in enumerate(pairs)
        ]
    elif embed_cfg.SOURCE == 'attngan':
        data = utils.AttnGANData(embed_cfg.DATA_DIR, embed_cfg.CAPTIONS_PER_IMAGE)
        if src not in data.keys:
            raise utils.UserError(
                f"EMBED.SPLITS.{split}={src!r}: the AttnGAN layout has train and test"
            )
        items = [
            (k, data.image_path(k), class_id, data.raw_captions(k))
            for k, class_id in zip(data.keys[src], data.class_ids(src))
        ]
    else:
        raise utils.UserError(f"EMBED.SOURCE={embed_cfg.SOURCE!r}: expected coco or attngan")
    images, captions = [], []
    for key, path, cls, caps in items:
        caps = caps[: embed_cfg.MAX_CAPTIONS] if embed_cfg.MAX_CAPTIONS > 0 else caps
        images.append([key, path, int(cls), len(captions), len(caps)])
        captions += [(key, j, text) for j, text in enumerate(caps)]
    return images, captions


def caption_encoder(embed_cfg, device):
    """encode(texts) -> words (B, MAX_LEN, D), lengths (B,), sentence (B, D); and what it is."""
    import torch.nn.functional as F

    L = embed_cfg.MAX_LEN
    if embed_cfg.ENCODER.endswith('.pth'):  # a project encoder (pretrain_DAMSM.py)
        import models

        text_enc = models.load_encoders(embed_cfg.ENCODER, device)[0]

        def encode(texts):
            words, sent, pad = text_enc.encode(list(texts))
            words, pad = words.transpose(1, 2)[:, :L], pad[:, :L]
            # its own sentence vector: the one its contrastive training aligned with images
            return F.pad(words, (0, 0, 0, L - words.shape[1])), (~pad).sum(1).clamp(min=1), sent

        return encode, {
            'kind': 'project',
            'name': embed_cfg.ENCODER,
            'dim': text_enc.spec['dim'],
            'sha256': utils.sha256(embed_cfg.ENCODER),
        }
    from transformers import AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(embed_cfg.ENCODER)
        bert = AutoModel.from_pretrained(embed_cfg.ENCODER).to(device).eval()
    except (OSError, ValueError) as e:
        raise utils.UserError(
            f"EMBED.ENCODER={embed_cfg.ENCODER}: cannot load a transformers model and tokenizer "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        )

    def encode(texts):
        # [CLS] + first L-2 word pieces + [SEP], zero-padded to L, as the original
        enc = tok(
            list(texts), padding='max_length', truncation=True, max_length=L, return_tensors='pt'
        ).to(device)
        h = bert(**enc).last_hidden_state
        n = enc['attention_mask'].sum(1)
        # The original's sentence: the sum of all L outputs (padding positions included) / true length
        return h, n, h.sum(1) / n[:, None]

    return encode, {
        'kind': 'transformers',
        'name': embed_cfg.ENCODER,
        'dim': bert.config.hidden_size,
    }


def embed_captions(embed_cfg, device, log, encoder=None):
    """Write <OUT_DIR>/<split>_<i>.pt shards of SHARD_SIZE captions (fp16 words (N, L, D),
    lengths, fp16 sentences, keys, caption indices, texts) and index.json (settings, encoder,
    image table). Resumable: a shard on disk is complete (written atomically) and skipped."""
    import time

    import torch

    encode, info = encoder or caption_encoder(embed_cfg, device)
    settings = {
        k: embed_cfg[k]
        for k in ('SOURCE', 'DATA_DIR', 'MAX_CAPTIONS', 'ENCODER', 'MAX_LEN', 'SHARD_SIZE')
    }
    settings['SPLITS'] = dict(embed_cfg.SPLITS)
    # the encoder's bytes, not only its path: a retrained encoder at the same path must not
    # leave shards of the old one to be skipped as finished
    if info.get('sha256'):
        settings['ENCODER_SHA256'] = info['sha256']
    index_path = os.path.join(embed_cfg.OUT_DIR, 'index.json')
    if os.path.isfile(index_path):
        with open(index_path) as f:
            old = json.load(f)['settings']
        if old != settings:
            diff = {
                k: (old.get(k), settings.get(k))
                for k in {**old, **settings}
                if old.get(k) != settings.get(k)
            }
            raise utils.UserError(
                f"{index_path}: embeddings written with other settings {diff} (old, new); "
                "choose another EMBED.OUT_DIR or delete it"
            )
    tables = {s: caption_table(embed_cfg, s) for s in embed_cfg.SPLITS}
    S = embed_cfg.SHARD_SIZE
    index = {
        'settings': settings,
        'encoder': info,
        'max_len': embed_cfg.MAX_LEN,
        'dim': info['dim'],
        'dtype': 'float16',
        'complete': False,
        'splits': {
            s: {
                'num_captions': len(caps),
                'shard_size': S,
                'images': images,
                'shards': [f'{s}_{i:05d}.pt' for i in range(math.ceil(len(caps) / S))],
            }
            for s, (images, caps) in tables.items()
        },
    }
    os.makedirs(embed_cfg.OUT_DIR, exist_ok=True)
    utils.atomic_write_text(index_path, json.dumps(index))
    done = skipped = 0
    for split, (_, caps) in tables.items():
        done_split = 0
        todo = [
            i
            for i, name in enumerate(index['splits'][split]['shards'])
            if not os.path.isfile(os.path.join(embed_cfg.OUT_DIR, name))
        ]
        skipped += len(index['splits'][split]['shards']) - len(todo)
        n_batches = sum(
            math.ceil(len(caps[i * S : (i + 1) * S]) / embed_cfg.BATCH_SIZE) for i in todo
        )
        bar = utils.progress(
            total=n_batches, desc=f'embed {split}', every=max(1, n_batches // 20), log=log
        )
        for i in todo:
            rows = caps[i * S : (i + 1) * S]
            words, lengths, sents = [], [], []
            with torch.inference_mode():
                for b in range(0, len(rows), embed_cfg.BATCH_SIZE):
                    w, n, s = encode([t for _, _, t in rows[b : b + embed_cfg.BATCH_SIZE]])
                    words.append(w.half().cpu())
                    lengths.append(n.cpu())
                    sents.append(s.half().cpu())
                    done, done_split = done + len(w), done_split + len(w)
                    bar.set_postfix(
                        captions_per_s=round(done_split / max(time.time() - bar.t0, 1e-6))
                    )
                    bar.update()
            utils.atomic_torch_save(
                {
                    'words': torch.cat(words),
                    'lengths': torch.cat(lengths).long(),
                    'sent': torch.cat(sents),
                    'keys': [k for k, _, _ in rows],
                    'caption_index': torch.tensor([j for _, j, _ in rows]),
                    'texts': [t for _, _, t in rows],
                },
                os.path.join(embed_cfg.OUT_DIR, index['splits'][split]['shards'][i]),
            )
        bar.close()
    index['complete'] = True
    utils.atomic_write_text(index_path, json.dumps(index))
    size = sum(
        os.path.getsize(os.path.join(embed_cfg.OUT_DIR, n))
        for sp in index['splits'].values()
        for n in sp['shards']
    )
    log.info(
        f"{embed_cfg.OUT_DIR}: {done} captions embedded, {skipped} finished shards skipped; "
        f"{sum(len(c) for _, c in tables.values())} captions x {embed_cfg.MAX_LEN} x {info['dim']} "
        f"in {size / 1e9:.3f} GB (fp16)"
    )
    return index


# ----------------------------------------------------------------------------
# filter: text2img's Wukong food subset (dealData_wukong.ipynb), over local images
# ----------------------------------------------------------------------------
def caption_rule(caption, filter_cfg, forbidden, keywords):
    """The first caption rule a caption breaks, or None."""
    if len(caption) > filter_cfg.MAX_CAPTION_LEN:
        return 'caption_too_long'
    if forbidden.search(caption):
        return 'forbidden_characters'
    if any(len(p) > filter_cfg.MAX_PIECE_LEN for p in re.split(r'[;,\s]', caption)):
        return 'piece_too_long'
    if not any(
        caption[i : i + n] in keywords
        for i in range(len(caption))
        for n in range(1, filter_cfg.KEYWORD_MAX_LEN + 1)
    ):
        return 'no_keyword'
    return None


def image_rule(path, filter_cfg):
    """The first image rule an image breaks, or None (reads the header only)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError):
        return 'unreadable_image'
    if max(w, h) > filter_cfg.MAX_ASPECT * min(w, h):
        return 'aspect_ratio'
    if min(w, h) < filter_cfg.MIN_SIDE:
        return 'too_small'
    return None


def filter_pairs(filter_cfg, log):
    """Caption rules, then image rules (each drop counted under its first broken rule), a
    seeded 9:1 split; writes {train,val}_clean.csv (open_clip: tab, filepath/title) and
    DALLE.{train,val}.jsonl, image paths relative to OUT_DIR."""
    pairs = utils.read_csv_pairs(
        filter_cfg.INPUT_CSV, filter_cfg.IMG_KEY, filter_cfg.CAPTION_KEY, filter_cfg.SEP
    )
    if not os.path.isfile(filter_cfg.KEYWORDS):
        raise utils.UserError(f"{filter_cfg.KEYWORDS}: keyword file not found (one keyword a line)")
    with open(filter_cfg.KEYWORDS, encoding='utf-8') as f:
        keywords = {w.strip() for w in f if w.strip()}
    forbidden = re.compile(filter_cfg.FORBIDDEN)
    drops, kept = {}, []
    for path, caption in pairs:
        caption = caption.strip()
        rule = caption_rule(caption, filter_cfg, forbidden, keywords) or image_rule(
            path, filter_cfg
        )
        if rule:
            drops[rule] = drops.get(rule, 0) + 1
        else:
            kept.append((path, caption))
    order = np.random.RandomState(filter_cfg.SPLIT_SEED).permutation(len(kept))
    n_val = int(round(filter_cfg.VAL_FRACTION * len(kept)))
    splits = {'train': [kept[i] for i in order[n_val:]], 'val': [kept[i] for i in order[:n_val]]}
    os.makedirs(filter_cfg.OUT_DIR, exist_ok=True)
    for split, items in splits.items():
        rel = [
            (os.path.relpath(os.path.abspath(p), os.path.abspath(filter_cfg.OUT_DIR)), t)
            for p, t in items
        ]
        utils.atomic_write_text(
            os.path.join(filter_cfg.OUT_DIR, f'{split}_clean.csv'),
            'filepath\ttitle\n' + ''.join(f'{p}\t{t}\n' for p, t in rel),
        )
        utils.atomic_write_text(
            os.path.join(filter_cfg.OUT_DIR, f'DALLE.{split}.jsonl'),
            ''.join(
                json.dumps({'image_path': p, 'sentences': t}, ensure_ascii=False) + '\n'
                for p, t in rel
            ),
        )
    log.info(
        f"{filter_cfg.INPUT_CSV}: {len(pairs)} pairs -> {len(kept)} kept "
        f"(train {len(splits['train'])}, val {len(splits['val'])}); dropped: "
        + ', '.join(f'{k} {v}' for k, v in sorted(drops.items()))
    )
    return {
        'input_pairs': len(pairs),
        'kept': len(kept),
        'train': len(splits['train']),
        'val': len(splits['val']),
        **{f'dropped_{k}': v for k, v in drops.items()},
    }


def main():
    args = utils.base_parser(__doc__.splitlines()[0]).parse_args()
    run = utils.setup(args, DEFAULTS, tensorboard=False)
    cfg = run.cfg
    if cfg.TASK == 'shapes':
        make_shapes(cfg.SHAPES, run.log)
        utils.AttnGANData(
            cfg.SHAPES.OUT_DIR, cfg.SHAPES.CAPTIONS_PER_IMAGE
        )  # builds captions.pickle
        summarize(cfg.SHAPES.OUT_DIR, run.log)
        utils.write_metrics(
            run.out,
            {
                'dataset': cfg.SHAPES.OUT_DIR,
                'num_train': cfg.SHAPES.NUM_TRAIN,
                'num_test': cfg.SHAPES.NUM_TEST,
            },
        )
    elif cfg.TASK == 'embed':
        index = embed_captions(cfg.EMBED, run.device, run.log)
        utils.write_metrics(
            run.out,
            {
                'embeddings': cfg.EMBED.OUT_DIR,
                'dim': index['dim'],
                **{f'num_captions_{s}': sp['num_captions'] for s, sp in index['splits'].items()},
            },
        )
    elif cfg.TASK == 'filter':
        utils.write_metrics(run.out, filter_pairs(cfg.FILTER, run.log))
    else:
        raise utils.UserError(f"TASK={cfg.TASK!r}: expected one of shapes, embed, filter")


if __name__ == '__main__':
    utils.run_main(main)
