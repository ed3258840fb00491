"""Enrol and verify on a device without torch: onnxruntime, numpy and soundfile only.

`fedspeaker export` writes ``embedder.onnx`` beside the TorchScript ``embedder.pt``: the
GE2E model from the power spectrogram of its 1.6 s windows to the utterance's embedding
(mel filterbank, frozen LSTM, fine-tuned projection, windows averaged). What comes
before it, here in numpy, is what GE2EWaveformEmbedder does in torch: volume normalised
to -30 dBFS, the windows chosen as resemblyzer chooses them, a centred 25 ms periodic
Hann STFT every 10 ms. The export checks that the two agree (fedspeaker/device/export.py).
Enrolments and the accept rule are fedspeaker/device/voiceprints.py's, so one enrolment
file serves both runtimes.

    python -m fedspeaker.device.edge enroll --model EXPORT --speaker ann a.wav b.wav
    python -m fedspeaker.device.edge verify --model EXPORT --speaker ann c.wav   # exit 0 accept, 1 reject
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fedspeaker.device.frontend import SAMPLE_RATE, embed_wave, onnx_session
from fedspeaker.device.voiceprints import EnrolmentStore, default_enrolments, verify
from fedspeaker.data.decode import decode
from fedspeaker.errors import AudioError, FedSpeakerError

ONNX_FILE = "embedder.onnx"
MANIFEST_FILE = "manifest.json"
MIN_SECONDS = 0.3


def load_wave(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A mono float32 waveform; audio at another rate is refused (resampling needs torch here)."""
    wave, rate = decode(path)
    if rate != sample_rate:
        raise AudioError(f"{path}: {rate} Hz; the torch-free path takes {sample_rate} Hz audio only "
                         f"(convert it first, e.g. `sox IN -r {sample_rate} OUT`)")
    if wave.size < MIN_SECONDS * sample_rate:
        raise AudioError(f"{path}: too short ({wave.size / sample_rate:.2f} s, need at least {MIN_SECONDS} s)")
    return wave


class OnnxEmbedder:
    """An export folder's embedder.onnx, for enrolment and verification."""

    def __init__(self, folder: Path) -> None:
        try:
            self.manifest = json.loads((folder / MANIFEST_FILE).read_text())
            self.session = onnx_session(folder / ONNX_FILE)
        except (OSError, ValueError, KeyError) as exc:
            raise FedSpeakerError(f"{folder}: not a fedspeaker export with {ONNX_FILE} ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors name no common base
            raise FedSpeakerError(f"{folder / ONNX_FILE}: onnxruntime cannot load it ({exc})") from None
        self.model_id = self.manifest["source_sha256"]
        self.verification = self.manifest.get("verification")

    def embed_file(self, path: Path) -> np.ndarray:
        return embed_wave(self.session, load_wave(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedspeaker.device.edge",
                                     description="enrol and verify speakers with an export's "
                                     "embedder.onnx (no torch)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("enroll", "verify"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="the folder `fedspeaker export` wrote")
        p.add_argument("--speaker", required=True)
        p.add_argument("--enrolments", help="enrolment file (default: enrolments.json in the folder)")
        if name == "verify":
            p.add_argument("--threshold", type=float, help="default: the threshold saved with the model (its operating point)")
        p.add_argument("audio", nargs="+" if name == "enroll" else None)
    args = parser.parse_args(argv)
    model = Path(args.model).expanduser()
    path = Path(args.enrolments).expanduser() if args.enrolments else default_enrolments(model)
    try:
        embedder = OnnxEmbedder(model)
        if args.command == "enroll":
            result = EnrolmentStore(path, embedder.model_id).enroll(embedder, args.speaker,
                                                                      [Path(a) for a in args.audio])
            for reason in result.skipped:
                print(f"fedspeaker: skipped {reason}")
            print(f"enrolled {args.speaker!r} from {result.files} file(s) in {path}")
            return 0
        if not path.exists():
            raise FedSpeakerError(f"{path}: no enrolment file; enrol first")
        decision = verify(embedder, EnrolmentStore(path, embedder.model_id), args.speaker,
                          Path(args.audio), args.threshold)
    except FedSpeakerError as exc:
        print(f"fedspeaker: error: {exc}", file=sys.stderr)
        return 2
    verdict, relation = ("accept", ">=") if decision.accept else ("reject", "<")
    llr = "" if decision.llr is None else f" (LLR {decision.llr:+.2f})"
    print(f"{verdict}: {args.audio} as {args.speaker!r}: score {decision.score:.3f}{llr} {relation} "
          f"threshold {decision.threshold:.3f} ({decision.threshold_source})")
    return 0 if decision.accept else 1


if __name__ == "__main__":
    sys.exit(main())
