"""fedspeaker: federated speaker recognition with Flower and Opacus."""

__version__ = "0.1.0"
