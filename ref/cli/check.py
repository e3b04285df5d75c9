"""`refsim check DIR DUMP`: compare a dump with a golden vector set (exit 1 on any difference)."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("golden", metavar="DIR", help="vector set written by `refsim golden`")
    p.add_argument("dump", metavar="DUMP", help="folder with the same layout: <sample>/<tensor>.npy or .memh")
    p.add_argument("--tensors", metavar="GLOB", help="only tensors matching these comma-separated globs")
    p.add_argument("--atol", type=int, default=0, metavar="N", help="tolerate differences up to N (default 0: bit-exact)")
    p.add_argument("--memh-word-bits", type=int, choices=(8, 16, 32, 64),
                   help="word width of .memh dumps (default: the set's memh width, else 32)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    listing = p.add_mutually_exclusive_group()
    listing.add_argument("--only-mismatches", dest="matches", action="store_false", default=None,
                         help="list only mismatching and missing tensors (the default above 50 results)")
    listing.add_argument("--all", dest="matches", action="store_true", help="list every tensor, matching ones too")


def main(args) -> int:
    from refsim.golden.capture import tensor_filter
    from refsim.golden.check import check, format_report

    wanted = tensor_filter(args.tensors) if args.tensors else None
    report = check(args.golden, args.dump, wanted, args.atol, args.memh_word_bits)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_report(report, args.matches))
    return 0 if report.ok else 1
