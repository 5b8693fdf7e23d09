from mkd_ray.models.deeplab import DeepLabV3Plus, build_model

__all__ = ["DeepLabV3Plus", "build_model"]
