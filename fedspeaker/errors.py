"""Errors a user can act on: the CLI prints their message, never a traceback."""


class FedSpeakerError(Exception):
    """Base class: the message says what is wrong and what to change."""


class ConfigError(FedSpeakerError):
    """A run-config option or command-line flag has a value it does not accept."""


class AudioError(FedSpeakerError):
    """One audio file cannot be used (unreadable, empty, too short, not audio)."""


class CorpusError(FedSpeakerError):
    """The corpus or its partition cannot support a run (too few speakers, empty shard)."""


class ModelError(FedSpeakerError):
    """A model or its weights cannot be loaded."""
