"""README's commands work as written: every script it runs exists, every --cfg file merges into
that script's defaults, every --set names a key, and the flags parse with the script's parser."""

import importlib
import os
import re
import shlex
import sys

import pytest

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scripts whose parse_args takes argv; the others read sys.argv.
ARGV_PARSERS = {'clip_sort', 'dalle_gen', 'pretrain_DAMSM', 'train_dalle', 'train_vae'}
SYS_ARGV_PARSERS = {'fid_score', 'train_judge'}


def readme_commands():
    """(line, script, arguments) of each `python` / `torchrun` command in README's bash blocks."""
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(line.replace(' &', ' '), comments=True)
            scripts = [i for i, w in enumerate(words) if w.endswith('.py')]
            if not scripts or words[0] in ('make',):
                continue
            i = scripts[0]
            args = [w for w in words[i + 1 :] if w not in ('>', '2>&1') and not w.endswith('.log')]
            commands.append((line.strip(), words[i], args))
    return commands


COMMANDS = readme_commands()


def test_readme_has_the_commands_of_every_script():
    scripts = {os.path.basename(s) for _, s, _ in COMMANDS}
    for name in (
        'preprocess_data.py',
        'train_judge.py',
        'fid_score.py',
        'inception_score.py',
        'pretrain_DAMSM.py',
        'main.py',
        'train_vae.py',
        'train_dalle.py',
        'dalle_gen.py',
        'clip_sort.py',
    ):
        assert name in scripts, f'README runs no {name}'


def option_values(args, flag):
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


@pytest.mark.parametrize('line, script, args', COMMANDS, ids=[c[0][:70] for c in COMMANDS])
def test_readme_command_parses(line, script, args, monkeypatch):
    assert os.path.isfile(os.path.join(ROOT, script)), f'{line}: no {script}'
    name = script[:-3]
    if '/' in script:  # bench/ scripts: their existence is what README promises
        return
    module = importlib.import_module(name)
    cfg_files = option_values(args, '--cfg')
    if hasattr(module, 'DEFAULTS') and cfg_files:
        path = os.path.join(ROOT, cfg_files[0])
        file_cfg = utils.load_yaml(path)
        if name == 'main' and file_cfg.get('MODEL') == 'XMCGAN':
            module = importlib.import_module('xmc_gan')
        cfg = utils.to_cfg({**utils.COMMON_DEFAULTS, **module.DEFAULTS})
        utils.merge_cfg(cfg, file_cfg, path)
        utils.apply_set(cfg, option_values(args, '--set'))
    if name in ARGV_PARSERS:
        module.parse_args(args)
    elif name in SYS_ARGV_PARSERS:
        monkeypatch.setattr(sys, 'argv', [script, *args])
        module.parse_args()
    elif name in ('main', 'xmc_gan', 'preprocess_data'):
        parser = utils.base_parser('README')
        parser.add_argument('--watch', action='store_true')  # xmc_gan.py's own flag
        parser.parse_args(args)
