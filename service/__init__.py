"""adaptserve: many parameter-efficient text-classification tasks served over one frozen backbone."""

__version__ = "0.1.0"
