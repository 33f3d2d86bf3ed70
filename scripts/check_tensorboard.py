#!/usr/bin/env python3
"""Load a Switchyard run's TensorBoard event files with TensorBoard's own reader.

Usage: check_tensorboard.py RUN_DIR_OR_LOGDIR [--require TAG ...] [--steps N]
                            [--require-text TAG[=SUBSTRING] ...] [--require-hparam KEY ...]

Prints every scalar tag with its (step, value) pairs. Exits 1 if a required tag is
missing or, with --steps N, if a required tag does not show exactly one curve of steps
1..N (each step once, in order: a resumed run must not leave the steps it recomputed
twice), or if a required text summary (TensorBoard's text dashboard) is missing or lacks
SUBSTRING, or a required hyperparameter (HPARAMS dashboard) is missing; 2 if no event file
could be loaded.
"""
import argparse
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="run directory (uses its tensorboard/ subfolder) or a TensorBoard log directory")
    ap.add_argument("--require", action="append", default=[], metavar="TAG", help="scalar tag that must be present")
    ap.add_argument("--steps", type=int, metavar="N", help="each required tag must have exactly the steps 1..N, once each, in order")
    ap.add_argument("--require-text", action="append", default=[], metavar="TAG[=SUBSTRING]", help="text summary that must be present (and contain SUBSTRING)")
    ap.add_argument("--require-hparam", action="append", default=[], metavar="KEY", help="hyperparameter that the run's session-start summary must hold")
    args = ap.parse_args()

    logdir = args.path
    if os.path.isdir(os.path.join(logdir, "tensorboard")):
        logdir = os.path.join(logdir, "tensorboard")
    events = [f for f in os.listdir(logdir) if f.startswith("events.out.tfevents.")] if os.path.isdir(logdir) else []
    if not events:
        print(f"error: no events.out.tfevents.* files in {logdir}", file=sys.stderr)
        return 2

    # size_guidance 0 = keep every scalar, so the printout is complete.
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    print(f"logdir {logdir}: {len(events)} event file(s), {len(tags)} scalar tag(s)")
    for tag in sorted(tags):
        points = ", ".join(f"{e.step}:{e.value:.6g}" for e in acc.Scalars(tag))
        print(f"  {tag}: {points}")

    missing = [t for t in args.require if t not in tags]
    if missing:
        print(f"error: missing scalar tag(s) {missing} in {logdir}; present: {sorted(tags)}", file=sys.stderr)
        return 1
    texts = acc.Tags().get("tensors", [])
    for spec in args.require_text:
        tag, _, want = spec.partition("=")
        if tag not in texts:
            print(f"error: missing text summary {tag!r} in {logdir}; present: {sorted(texts)}", file=sys.stderr)
            return 1
        # The text plugin's string tensor (what TensorBoard's text dashboard shows).
        text = acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
        print(f"  text {tag}: {len(text)} characters")
        if want not in text:
            print(f"error: text summary {tag!r} does not contain {want!r}", file=sys.stderr)
            return 1
    if args.require_hparam:
        from tensorboard.plugins.hparams import plugin_data_pb2
        content = acc.PluginTagToContent("hparams").get("_hparams_/session_start_info")
        if content is None:
            print(f"error: no hparams session-start summary in {logdir}", file=sys.stderr)
            return 1
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        print(f"  hparams: {len(hparams)} keys")
        for key in args.require_hparam:
            if key not in hparams:
                print(f"error: hyperparameter {key!r} missing; present: {sorted(hparams)[:20]}...", file=sys.stderr)
                return 1
            print(f"  hparam {key} = {hparams[key]}".rstrip())
    if args.steps is not None:
        for tag in args.require:
            steps = [e.step for e in acc.Scalars(tag)]
            if steps != list(range(1, args.steps + 1)):
                print(f"error: {tag}: steps {steps}, expected one curve 1..{args.steps}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
