"""Models: backbones, the WSDDN teacher and the student classifier."""
