"""distalex: train AlexNet on one device, with DDP, or split into the 2012 paper's towers."""

__version__ = "0.1.0"
