"""fedtwin: federated, differentially private synthetic twins of medical imaging archives."""

__version__ = "0.1.0"
