"""Calibration: what the model's own behaviour says about which errors cost most.

`calibrate` gathers the statistics (hidden-state moment, input Fisher, token frequencies) from a
text or from text the model samples itself, cached and verified; `sensitivity` turns them into
the metric and row weights the calibrated methods minimise against.
"""
