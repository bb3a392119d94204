"""lmembed info: versions, devices, bundled corpora."""

from __future__ import annotations

import platform


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and bundled corpora")
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
    print("bundled corpora:")
    for name, c in sorted(REGISTRY.items()):
        print(f"  {name:12s} {c.description}")
    from ..data.parallel import PARALLEL_REGISTRY

    print("bundled parallel corpora (train-seq2seq --data):")
    for name, s in sorted(PARALLEL_REGISTRY.items()):
        print(f"  {name:17s} {s.description}")
    return 0
