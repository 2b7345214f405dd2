"""Constants the method defines (docs/method.md), named once and imported everywhere."""

# Output stride of every network: one feature-grid cell per 8 x 8 input pixels.
STRIDE = 8
# Label of pixels (and affinity-grid cells) that no loss or metric counts.
IGNORE_LABEL = 255
# ImageNet statistics of the backbone's pretraining (RGB, on x / 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
