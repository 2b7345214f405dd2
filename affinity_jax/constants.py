"""Constants the method defines (docs/method.md), named once and imported everywhere."""

# Output stride of every network: one feature-grid cell per 8 x 8 input pixels.
STRIDE = 8
# IRN's grid (docs/method.md §11): its stride-4 CAMs, relation labels, boundary map and walk.
IRN_STRIDE = 4
# Label of pixels (and affinity-grid cells) that no loss or metric counts.
IGNORE_LABEL = 255
# PASCAL VOC's 20 classes in label order (mask value c + 1 is class c; 0 is the background).
# Here, not in data/, so that scoring masks (`affinity-jax evaluate`) needs no TensorFlow.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")
# ImageNet statistics of the backbone's pretraining (RGB, on x / 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Caffe's VGG-16 (DeepLab's vgg16_20M.caffemodel) was trained on BGR images in 0..255 minus this
# mean pixel and no division; given in RGB order, as the original's network/vgg16d.py does.
CAFFE_MEAN_RGB = (122.675, 116.669, 104.008)
# The input conventions of `data.transforms.normalize` / `models.normalize_images`:
# "imagenet" = RGB, (x / 255 - IMAGENET_MEAN) / IMAGENET_STD (ResNet-38);
# "caffe_bgr" = BGR, x - CAFFE_MEAN (VGG-16).
INPUT_CONVENTIONS = ("imagenet", "caffe_bgr")
# Every architecture a checkpoint can hold: "backbone" is the trunk alone (the ImageNet weights
# that initialise the others), the rest are the networks of the pipeline; either backbone.
# "relation" is IRN's inter-pixel relation network (boundaries and displacements), on
# ResNet-50 only.
ARCHS = ("backbone", "cam", "affinity", "seg", "relation")
# Those the original repository has (it has no segmentation network; IRN's is not PSA's).
ORIGINAL_ARCHS = tuple(a for a in ARCHS if a not in ("seg", "relation"))
# The original's two backbones and IRN's ResNet-50 (config key model.backbone) -> the input
# convention of their pretrained weights (data.transforms.normalize). torchvision's ResNet-50
# takes ImageNet-normalised RGB, as IRN's voc12/dataloader.py feeds it.
BACKBONES = {"resnet38": "imagenet", "vgg16": "caffe_bgr", "resnet50": "imagenet"}
# Those of the PSA original (its networks, its checkpoints, `convert psa-pytorch`).
PSA_BACKBONES = ("resnet38", "vgg16")
