"""fedtwin: federated, differentially private synthetic twins of medical imaging archives."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from fedtwin import TwinDataset` without importing torch for every `fedtwin` command
    if name == "TwinDataset":
        from fedtwin.twin import TwinDataset

        return TwinDataset
    raise AttributeError(f"module 'fedtwin' has no attribute {name!r}")
