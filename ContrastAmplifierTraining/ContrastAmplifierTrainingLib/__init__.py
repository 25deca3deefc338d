"""ContrastAmplifierTrainingLib: five-fold training of the contrast-amplification ensemble and model-bundle export.

May import ContrastAmplifierLib (network, preprocessing, bundles); never the reverse.
"""

__version__ = "0.1.0"
