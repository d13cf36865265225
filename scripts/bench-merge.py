"""One table from several `bdcodec bench` runs: their results.csv rows taken together.

    python scripts/bench-merge.py [--csv ALL.csv] RESULTS.csv ...

Prints the bench's tables (curves, and BD-rates against effort 0 when the runs carry several efforts)
over the images that every curve has at every setting, so benches run image by image, or on several
machines, give the table one bench over all of them would.  --csv writes the rows used.
"""
import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bdcodec.bench import _curves, _effort_table, _report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--csv", type=Path)
    args = ap.parse_args()
    rows, fields = [], []
    for path in args.results:
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                missing = {"codec", "setting", "image", "bpp", "psnr"} - set(reader.fieldnames or ())
                if missing:
                    sys.exit(f"bench-merge: {path}: not a bench's results.csv (missing columns: {', '.join(sorted(missing))})")
                fields += [k for k in reader.fieldnames if k not in fields]
                for r in reader:
                    rows.append({k: (v if k in ("codec", "image") else float(v)) for k, v in r.items() if v != ""})
        except (OSError, ValueError) as exc:
            sys.exit(f"bench-merge: {path}: {exc}")
    keys = {(r["codec"], r["setting"]) for r in rows}
    images = sorted({r["image"] for r in rows})
    complete = [i for i in images if keys <= {(r["codec"], r["setting"]) for r in rows if r["image"] == i}]
    if not complete:
        sys.exit("bench-merge: no image has every curve at every setting")
    left_out = sorted(set(images) - set(complete))
    rows = [r for r in rows if r["image"] in complete]
    curves = _curves(rows)
    summary = {"images": len(complete), "folder": f"{len(args.results)} results files", "curves": curves,
               "bd": [], "effort": _effort_table(curves, rows), "speed": [], "notes": []}
    if left_out:
        summary["notes"].append(f"left out, incomplete: {', '.join(left_out)}")
    # the bench's report, less its tables that have no rows here (BD-rates against baselines, speed)
    blocks = _report(summary).split("\n\n")
    print("\n\n".join(b for b in blocks if not (b.startswith("|") and len(b.splitlines()) <= 2)))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
