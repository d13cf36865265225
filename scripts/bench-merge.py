"""One table from several `bdcodec bench` runs: their results.csv rows taken together.

    python scripts/bench-merge.py [--curves NAME,...] [--csv ALL.csv] RESULTS.csv ...

Prints the bench's tables (curves, and BD-rates against effort 0 when the runs carry several efforts)
over the images that every curve has at every setting, so benches run image by image, or on several
machines, give the table one bench over all of them would.  --curves takes only the curves named (e.g.
bdcodec-fidelity,bdcodec-fidelity-e1), so a curve measured on fewer images leaves none out.  --csv writes
the rows used.
"""
import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bdcodec.bench import _curves, _effort_table, _report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="results.csv files of `bdcodec bench` runs")
    ap.add_argument("--curves", help="comma-separated curve names (the results' codec column) to take; default: all")
    ap.add_argument("--csv", type=Path, help="write the rows the table was made from here")
    args = ap.parse_args()
    rows, fields, seen = [], [], {}
    for path in args.results:
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                missing = {"codec", "setting", "image", "bpp", "psnr"} - set(reader.fieldnames or ())
                if missing:
                    sys.exit(f"bench-merge: {path}: not a bench's results.csv (missing columns: {', '.join(sorted(missing))})")
                fields += [k for k in reader.fieldnames if k not in fields]
                for n, r in enumerate(reader, 2):
                    row = {k: (v if k in ("codec", "image") else float(v)) for k, v in r.items() if v != ""}
                    bad = [k for k in ("setting", "bpp", "psnr") if not math.isfinite(row.get(k, math.nan))]
                    if bad or not row.get("codec") or not row.get("image"):
                        sys.exit(f"bench-merge: {path}, line {n}: no valid {(bad or ['codec/image'])[0]}")
                    key = (row["codec"], row["setting"], row["image"])
                    if key in seen:
                        sys.exit(f"bench-merge: {path}, line {n}: {key[0]} at setting {key[1]:g} on {key[2]} "
                                 f"again (also in {seen[key]}): each image's results once")
                    seen[key] = path
                    rows.append(row)
        except (OSError, ValueError) as exc:
            sys.exit(f"bench-merge: {path}: {exc}")
    if args.curves:
        wanted = set(args.curves.split(","))
        unknown = sorted(wanted - {r["codec"] for r in rows})
        if unknown:
            sys.exit(f"bench-merge: no curve {unknown[0]} in the results given")
        rows = [r for r in rows if r["codec"] in wanted]
    if not rows:
        sys.exit("bench-merge: no rows in the results given")
    keys = {(r["codec"], r["setting"]) for r in rows}
    images = sorted({r["image"] for r in rows})
    complete = [i for i in images if keys <= {(r["codec"], r["setting"]) for r in rows if r["image"] == i}]
    if not complete:
        sys.exit("bench-merge: no image has every curve at every setting (" + "; ".join(
            f"{i}: {len({(r['codec'], r['setting']) for r in rows if r['image'] == i})} of {len(keys)}"
            for i in images) + " curve points)")
    left_out = sorted(set(images) - set(complete))
    rows = [r for r in rows if r["image"] in complete]
    curves = _curves(rows)
    notes = [f"left out, incomplete: {', '.join(left_out)}"] if left_out else []
    print(_report({"images": len(complete), "folder": f"{len(args.results)} results files", "curves": curves,
                   "bd": [], "effort": _effort_table(curves, rows), "speed": [], "notes": notes}))
    if args.csv:
        try:
            with open(args.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows({k: (int(v) if isinstance(v, float) and v.is_integer() and k in ("bytes", "pixels")
                                 else v) for k, v in r.items()} for r in rows)
        except OSError as exc:
            sys.exit(f"bench-merge: {args.csv}: {exc}")


if __name__ == "__main__":
    main()
