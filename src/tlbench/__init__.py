"""tlbench: one command to fine-tune image backbones and compare freeze policies."""

__version__ = "0.1.0"
