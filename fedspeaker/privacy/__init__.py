"""Differential privacy: Opacus DP-SGD, the ledger a client keeps, the guarantee, audits."""
