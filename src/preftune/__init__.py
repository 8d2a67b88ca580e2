"""preftune: align causal language models with human preferences (SFT, DPO and its family, ORPO,
SimPO) and measure whether it worked."""

__version__ = "0.1.0"
