"""Audit a run's global model with the membership-inference attacks of fedspeaker.audit.

Members are the utterances some client trained on (the union of the shards), non-members
the held-out utterances of the same speakers, both rebuilt from the settings saved
with the model.
"""

from __future__ import annotations

from pathlib import Path

from fedspeaker.audit import AuditResult, audit_model
from fedspeaker.data import load_speaker_data
from fedspeaker.errors import FedSpeakerError
from fedspeaker.inference import SpeakerModel
from simulations.partition import client_shards


def audit_run(model_path: Path) -> AuditResult:
    loaded = SpeakerModel.load(model_path)
    settings = loaded.settings
    data = load_speaker_data(settings)
    if list(data.split.speakers) != loaded.speakers:
        raise FedSpeakerError(f"{model_path}: its speakers are not those of {settings.corpus_dir} "
                              "with its seed; audit it where it was trained")
    members = sorted(i for shard in client_shards(settings) for i in shard)
    member_x, member_y = data.train_examples(members)
    other_x, other_y = data.test_examples()
    return audit_model(loaded.model, member_x, member_y, other_x, other_y, 4 * settings.crop_frames)
