"""Where compressed modules meet the model and the disk: finding and swapping embedding sites
(sites), saving and loading with checksums (io, verify), transformers' own door (quantizer),
plain transformers folders (plain), the rest of the model's dtype (body), and `open_model` (open),
the one way any name or folder becomes a model.
"""
