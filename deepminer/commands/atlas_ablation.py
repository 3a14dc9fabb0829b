"""``deepminer atlas-ablation``: is influence causal? Every unit silenced alone over an atlas's
reference patches; per class, the rank correlation of DeepMiner's influence with the measured drop."""
from __future__ import annotations

import argparse

NAME = "atlas-ablation"
HELP = "silence each unit alone over an atlas's reference patches: does influence predict the effect?"
DESCRIPTION = (
    "For every reference patch of the atlas ATLAS (its references.csv, read from --data) and every unit, "
    "the drop in each class's probability and logit when that unit's activations are set to zero "
    "(through the head, from one forward per batch), averaged over the patches predicted as the class; "
    "per class, the Spearman rank correlation between DeepMiner's influence (max activation x weight) "
    "and that drop, and the overlap of the top 20 units by each. Writes ATLAS/ablation.json (shown on the "
    "workbench's Atlas page). Example: deepminer atlas-ablation --model model_store/demo/model.pt "
    "--atlas model_store/demo/atlas --data var/reference-1024"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model checkpoint the atlas profiles")
    parser.add_argument("--atlas", required=True, help="atlas folder (written by deepminer dissect); ablation.json goes here")
    parser.add_argument("--data", default=None,
                        help="dataset folder of the atlas's reference patches (None: the folder the atlas was made from)")
    parser.add_argument("--batch-size", type=int, default=32, help="reference patches per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def run(args: argparse.Namespace) -> int:
    import sys

    from deepminer.atlas.ablation import FILE, atlas_ablation
    from deepminer.errors import InputError

    if args.batch_size < 1:
        raise InputError("--batch-size: must be a positive integer")
    res = atlas_ablation(args.model, args.atlas, args.data, batch_size=args.batch_size, device=args.device)
    print(f"{args.atlas}/{FILE}: {res['references']['patches']} reference patches, {res['model']['units']} units, "
          f"{res['timing_s']:.1f} s", file=sys.stderr)
    print("class      patches  spearman(influence, prob drop)  (logit drop)  top-20 overlap")
    for cls, e in res["per_class"].items():
        if "spearman_influence_prob_drop" not in e:
            print(f"{cls:<10} {e['patches']:>7}  -  ({e['note']})")
            continue
        rho_p, rho_l = e["spearman_influence_prob_drop"], e["spearman_influence_logit_drop"]
        print(f"{cls:<10} {e['patches']:>7}  {_f(rho_p):>30}  {_f(rho_l):>12}  {e['top_overlap']:>8}/{res['top']}")
    return 0


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:+.3f}"
