"""Models: backbones, the WSDDN teacher and its post-processing, the student classifier, the region ops they
share, their configs and builders, and :func:`~mlkd.models.build.model_from_checkpoint`."""
