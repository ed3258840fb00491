"""Deployment tooling: certificates and keys, Flower's SuperLink/SuperNode commands, child processes."""
