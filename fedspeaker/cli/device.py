"""`fedspeaker export | enroll | verify`: the trained global model, used on a device."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = ("MODEL is a global_model.pt written by simulate, central or a deployment, or a "
          "folder written by `fedspeaker export` (needs only torch).")


def export(args: argparse.Namespace) -> int:
    from fedspeaker.device.export import export_embedder

    done = export_embedder(Path(args.model).expanduser(), Path(args.out).expanduser())
    print(f"exported to {done.folder}: embedder.pt ({done.size_bytes / 1e6:.2f} MB, TorchScript, "
          f"waveform in, embedding out, features included) and manifest.json; it matches the "
          f"training stack's embeddings to {done.max_abs_diff:.1e}")
    print("load it with torch alone: torch.jit.load('embedder.pt')(waveform_16k_mono)")
    if done.onnx_cosine is not None:
        print(f"and embedder.onnx for devices without torch (cosine with embedder.pt {done.onnx_cosine:.8f}): "
              f"python -m fedspeaker.device.edge enroll|verify --model {done.folder} ... "
              "(needs only onnxruntime, numpy, soundfile)")
    return 0


def enroll(args: argparse.Namespace) -> int:
    from fedspeaker.device.voiceprints import EnrolmentStore, default_enrolments, load_embedder

    model_path = Path(args.model).expanduser()
    embedder = load_embedder(model_path)
    path = Path(args.enrolments).expanduser() if args.enrolments else default_enrolments(model_path)
    store = EnrolmentStore(path, embedder.model_id)
    replaced = args.speaker in store.speakers
    result = store.enroll(embedder, args.speaker, [Path(a) for a in args.audio])
    for reason in result.skipped:
        print(f"fedspeaker: skipped {reason}")
    print(f"{'re-enrolled' if replaced else 'enrolled'} {args.speaker!r} from {result.files} "
          f"file(s) in {path}" + (" (the previous voiceprint is replaced)" if replaced else ""))
    return 0


def verify(args: argparse.Namespace) -> int:
    from fedspeaker.device.voiceprints import EnrolmentStore, default_enrolments, load_embedder, verify

    model_path = Path(args.model).expanduser()
    embedder = load_embedder(model_path)
    path = Path(args.enrolments).expanduser() if args.enrolments else default_enrolments(model_path)
    if not path.exists():
        from fedspeaker.errors import FedSpeakerError

        raise FedSpeakerError(f"{path}: no enrolment file; enrol first with "
                              f"`fedspeaker enroll --model {args.model} --speaker {args.speaker} AUDIO...`")
    decision = verify(embedder, EnrolmentStore(path, embedder.model_id), args.speaker,
                      Path(args.audio), args.threshold)
    verdict = "accept" if decision.accept else "reject"
    relation = ">=" if decision.accept else "<"
    llr = "" if decision.llr is None else f" (LLR {decision.llr:+.2f})"
    print(f"{verdict}: {args.audio} as {args.speaker!r}: score {decision.score:.3f}{llr} {relation} "
          f"threshold {decision.threshold:.3f} ({decision.threshold_source})")
    return 0 if decision.accept else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the global model as one TorchScript file a device "
                       "runs with torch alone", epilog=EPILOG)
    p.set_defaults(command=export)
    p.add_argument("--model", required=True, help="global_model.pt")
    p.add_argument("--out", required=True, help="folder for embedder.pt and manifest.json")

    p = sub.add_parser("enroll", help="store a speaker's voiceprint in a local enrolment file",
                       epilog=EPILOG)
    p.set_defaults(command=enroll)
    p.add_argument("--model", required=True, metavar="MODEL")
    p.add_argument("--speaker", required=True, help="the name to enrol")
    p.add_argument("--enrolments", help="enrolment file (default: enrolments.json next to MODEL)")
    p.add_argument("audio", nargs="+", help="the speaker's recordings (.wav or .flac)")

    p = sub.add_parser("verify", help="accept or reject a recording as an enrolled speaker "
                       "(exit code 0 accept, 1 reject, 2 error)", epilog=EPILOG)
    p.set_defaults(command=verify)
    p.add_argument("--model", required=True, metavar="MODEL")
    p.add_argument("--speaker", required=True, help="the claimed speaker")
    p.add_argument("--enrolments", help="enrolment file (default: enrolments.json next to MODEL)")
    p.add_argument("--threshold", type=float, help="accept at or above this cosine score (default: "
                   "the model's operating point, fitted on validation speakers, saved with it)")
    p.add_argument("audio", help="the recording to verify")
