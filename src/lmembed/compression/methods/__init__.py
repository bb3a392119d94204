"""Compression methods: how a matrix is fitted into a storage kind (lmembed.compression.formats).

One file per method family; each registers its methods with lmembed.compression.registry when
imported (the registry imports every module of this package), so a new method is one new file.
"""
