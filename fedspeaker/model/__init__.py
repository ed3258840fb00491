"""Speaker models: the network, how it is built, and the saved global model (bundle)."""

from fedspeaker.model.tdnn import SpeakerNet, build_model

__all__ = ["SpeakerNet", "build_model"]
