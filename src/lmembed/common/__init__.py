"""Plumbing every part of lmembed shares: files, devices and seeds, report tables and plots."""
