"""edgepipe: trained model to validated edge-deployment builds."""

__version__ = "0.1.0"
