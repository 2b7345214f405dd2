"""Offline converters from the original's weight files to our orbax checkpoints.

- `convert_psa_pytorch(in_path, out_dir, arch, backbone=None)`: the PyTorch original's .pth,
  ResNet-38 or VGG-16 (needs torch).
- `convert_mxnet(in_path, out_dir)`: ademxapp's ImageNet ResNet-38 `.params`, read with numpy.
- `convert_caffe(in_path, out_dir)`: DeepLab's VGG-16 `.caffemodel`, read with numpy.
- `convert_torchvision(in_path, out_dir, arch="backbone")`: torchvision's ResNet-50 `.pth`
  (needs torch) or `.npz`, IRN's res50_cam.pth (arch "cam") or res50_irn.pth (arch
  "relation").
All raise `ConversionError` (a UserError) with a message naming the file or keys.
"""

from affinity_jax.convert.caffe import caffe_to_psa_state_dict, convert_caffe, read_caffemodel
from affinity_jax.convert.mxnet import (convert_mxnet, mxnet_name_to_psa,
                                        mxnet_to_psa_state_dict, read_mxnet_params)
from affinity_jax.convert.psa import (ConversionError, convert_psa_pytorch, infer_backbone,
                                      infer_width, psa_state_dict_shapes,
                                      psa_state_dict_to_variables, read_torch_state_dict)
from affinity_jax.convert.torchvision import (convert_torchvision, read_state_dict,
                                              torchvision_state_dict_shapes,
                                              torchvision_to_variables)

__all__ = ["ConversionError", "caffe_to_psa_state_dict", "convert_caffe", "convert_mxnet",
           "convert_psa_pytorch", "infer_backbone", "infer_width", "mxnet_name_to_psa",
           "mxnet_to_psa_state_dict", "psa_state_dict_shapes", "psa_state_dict_to_variables",
           "read_caffemodel", "read_mxnet_params", "read_torch_state_dict", "convert_torchvision",
           "read_state_dict", "torchvision_state_dict_shapes", "torchvision_to_variables"]
