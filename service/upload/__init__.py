"""Validating uploaded task bundles before anything is stored: multipart parts or an archive ->
the two bundle files (`intake`), the safetensors header parsed by hand (`safetensors_header`),
archive members checked (`archive`). The engine's own parse then checks the bundle against the
backbone (`service.hotswap`)."""
from service.upload.intake import BundleFiles, Part, UploadLimits, assemble

__all__ = ["BundleFiles", "Part", "UploadLimits", "assemble"]
