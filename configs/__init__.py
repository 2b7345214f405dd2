"""The shipped configs, installed as the package `affinity_jax.configs` (setup.cfg
`package_dir`), so that `--config synthetic:tiny` finds them outside a checkout.

Each file is loaded by path (`affinity_jax.config.load_config`), never imported as a module;
files that build on another load it from this folder by path.
"""
