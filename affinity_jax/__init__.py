"""affinity_jax: AffinityNet (PSA, Ahn & Kwak, CVPR 2018) in JAX/Flax.

Weakly supervised semantic segmentation from image-level labels: CAMs from a classifier,
AffinityNet trained on confident CAM regions, a random walk over the learned affinities, and a
segmentation network trained on the resulting pseudo labels.
"""

__version__ = "0.1.0"
