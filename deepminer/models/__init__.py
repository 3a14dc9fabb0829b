"""Models: backbones, the FCN form every explanation runs on, the WILDCAT head, checkpoints."""
from deepminer.models.backbones import (ARCHS, ArchSpec, arch_spec, build_model, efficientnet_lite0_imagenet_state,
                                        efficientnet_lite0_weights_path,
                                        imagenet_classifier, param_count, size_mb, tiny_cnn)
from deepminer.models.checkpoints import (FORMAT, file_sha256, guess_arch, import_deepminer, load_any, load_model,
                                          save_model, weights_sha256)
from deepminer.models.fcn import (FCN, GAPHead, IMAGENET_MEAN, IMAGENET_STD, PATCH_PX, TimmFeatures, patch_px,
                                  to_fcn)
from deepminer.models.wildcat import WildcatHead, resolve_k, wildcat_pool

__all__ = [
    "ARCHS", "ArchSpec", "FCN", "FORMAT", "GAPHead", "IMAGENET_MEAN", "IMAGENET_STD", "PATCH_PX", "TimmFeatures",
    "WildcatHead", "arch_spec", "build_model", "efficientnet_lite0_imagenet_state",
    "efficientnet_lite0_weights_path", "file_sha256", "guess_arch",
    "imagenet_classifier", "import_deepminer", "load_any", "load_model", "param_count", "patch_px", "resolve_k",
    "save_model", "size_mb", "tiny_cnn", "to_fcn", "wildcat_pool", "weights_sha256",
]
