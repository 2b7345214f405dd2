"""Offline converters from the original's weight files to our orbax checkpoints.

- `convert_psa_pytorch(in_path, out_dir, arch)`: the PyTorch original's .pth (needs torch).
- `convert_mxnet(in_path, out_dir)`: ademxapp's ImageNet ResNet-38 `.params`, read with numpy.
Both raise `ConversionError` (a UserError) with a message naming the file or keys.
"""

from affinity_jax.convert.mxnet import (convert_mxnet, mxnet_name_to_psa,
                                        mxnet_to_psa_state_dict, read_mxnet_params)
from affinity_jax.convert.psa import (ConversionError, convert_psa_pytorch, infer_width,
                                      psa_state_dict_shapes, psa_state_dict_to_variables,
                                      read_torch_state_dict)

__all__ = ["ConversionError", "convert_mxnet", "convert_psa_pytorch", "infer_width",
           "mxnet_name_to_psa", "mxnet_to_psa_state_dict", "psa_state_dict_shapes", "psa_state_dict_to_variables",
           "read_mxnet_params", "read_torch_state_dict"]
