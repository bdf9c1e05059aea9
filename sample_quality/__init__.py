"""sample_quality: offline sample-quality metrics for MNIST-like images.

A small CNN trained on MNIST (weights shipped, hash-checked) gives features;
`metrics` computes FD-MNIST, KID, precision/recall, classifier score, class
histogram and diversity on them.
"""
