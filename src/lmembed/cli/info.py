"""lmembed info: versions, devices, bundled models and corpora."""

from __future__ import annotations

import platform


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, bundled models and corpora")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    import transformers

    from .. import __version__
    from ..data.bundled import REGISTRY

    print(f"lmembed {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"python {platform.python_version()}")
    cuda = torch.cuda.is_available()
    print(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if cuda else 'cpu'}, "
          f"{torch.get_num_threads()} CPU threads")
    import importlib.util

    from ..models.pretrained import BUNDLED_MODELS

    print("bundled models (compress / eval MODEL, any case):")
    for name, m in sorted(BUNDLED_MODELS.items()):
        there = importlib.util.find_spec(m.package) is not None
        print(f"  {name:12s} {m.description}" + ("" if there else f" [not installed: {m.install_hint}]"))
    print("bundled corpora:")
    for name, c in sorted(REGISTRY.items()):
        print(f"  {name:12s} {c.description}")
    from ..data.parallel import PARALLEL_REGISTRY

    print("bundled parallel corpora (train-seq2seq --data):")
    for name, s in sorted(PARALLEL_REGISTRY.items()):
        print(f"  {name:17s} {s.description}")
    return 0
