"""The benchmark suite (not part of `make test`): `make bench`, or

    python -m tools.bench                      # everything, under 10 minutes on 2 cores → metrics/bench.json
    python -m tools.bench --quick --out x.json # tiny sizes, for the test that keeps this code working
    python -m tools.bench --only inference,serving

Each section measures contenders side by side in the same run (interleaved, repeated,
medians) and prints rows of: what, contender A, contender B, A/B, the target, whether it
holds. Ratios are the headline: this machine is shared and absolute times are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is tools/bench/...)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for the test)")
    ap.add_argument(
        "--out",
        default="metrics/bench.json",
        help="where the JSON goes (relative to the repo root)",
    )
    ap.add_argument("--only", default="", help="comma-separated sections (default: all)")
    args = ap.parse_args(argv)
    for key in ("GX_ANALYTICS_ENABLED", "GRADIO_ANALYTICS_ENABLED"):
        os.environ.setdefault(key, "False")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    from tools.bench.sections import OPT_IN, SECTIONS
    from tools.bench.tabular_cost import tabular_cost

    SECTIONS = {**SECTIONS, "tabular_cost": tabular_cost}
    from tools.bench.timing import machine, print_table

    names = [s for s in args.only.split(",") if s] or [s for s in SECTIONS if s not in OPT_IN]
    unknown = set(names) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {**machine(), "load_average_at_start": os.getloadavg()},
        "sections": {},
    }
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other work is running, the numbers "
            "will be noisy (the ratios less so) and torch's much slower",
            flush=True,
        )
    start, failed = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name in names:
            t0 = time.perf_counter()
            scratch = Path(tmp) / name
            scratch.mkdir()
            try:
                out = SECTIONS[name](args.quick, scratch)
            except Exception as e:  # noqa: BLE001 - one broken section must not hide the others' numbers
                traceback.print_exc()
                failed.append(name)
                out = {"rows": [], "notes": [], "details": {}, "error": f"{type(e).__name__}: {e}"}
            out["seconds"] = round(time.perf_counter() - t0, 1)
            print_table(
                f"{name} ({out['seconds']} s)",
                out["rows"],
                out["notes"] + ([f"FAILED: {out['error']}"] if "error" in out else []),
            )
            result["sections"][name] = {
                **out,
                "rows": [r.to_json() for r in out["rows"]],
                "date": result["date"],
            }
    result["seconds"] = round(time.perf_counter() - start, 1)
    out_path = Path(args.out)
    if (
        args.only and out_path.is_file()
    ):  # some sections: the others keep their last numbers (and their dates)
        earlier = json.loads(out_path.read_text())
        if earlier.get("quick") == args.quick:
            result["sections"] = {**earlier.get("sections", {}), **result["sections"]}
    targets = [
        (name, r)
        for name, s in result["sections"].items()
        for r in s["rows"]
        if r["holds"] is not None
    ]
    result["targets"] = {"held": sum(r["holds"] for _, r in targets), "total": len(targets)}
    print(
        f"\n== targets: {result['targets']['held']} of {len(targets)} hold ({result['seconds']} s in all)"
    )
    for name, r in targets:
        print(f"  {'yes' if r['holds'] else 'NO ':3}  {name}: {r['what'].strip()} ({r['target']})")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
