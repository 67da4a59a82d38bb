"""Does the planner's error estimate rank sites the way validation loss does?

For a finished quality ablation (``benchmarks/quality.py``'s ``quality_summary.json``), rebuild its
model and first batch (same seed, same data), compile one step per sub-token size with every site
compressed (``mode="all"``), and read each site's estimate from the report.  The ``gradient``
estimate is measured with the exact backward of the batch, so a site's value does not depend on
which other sites are compressed: every ablation row (a set of sites at one g) is scored from these
few compiles.  Per row: the isotropic ``1 - 1/g``, the activation estimate the ablation itself
recorded, the largest ``gradient`` estimate of its sites, and the sum of their ``update_share``.
Spearman's rank correlation of each with the row's validation-loss cost says which ranks better.

    python benchmarks/estimate_fit.py --summary results/gpu/v2/quality_byte/quality_summary.json \\
        --out results/estimate_fit/byte.json
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402

import velora_fx  # noqa: E402


def rank(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    rx, ry = rank(x), rank(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else None


PREDICTORS = ("isotropic", "activation_max", "gradient_max", "update_share_sum")


def score(rows: list[dict]) -> dict[str, float | None]:
    """Spearman's rank correlation of each predictor with the rows' loss cost."""
    out = {}
    for key in PREDICTORS:
        pairs = [(r[key], r["loss_cost_pct"]) for r in rows if r[key] is not None]
        out[key] = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    return out


def site_estimates(args, base: torch.nn.Module, batch, g: int) -> list[dict]:
    """Every VeLoRA site of one compiled step at sub-token size g: consumers, estimate, share."""
    torch._dynamo.reset()
    model = copy.deepcopy(base).to(args.device)
    backend = velora_fx.backend(compiler="eager", mode="all", sub_token_size=g, plan_cache=False)
    x, y = batch
    with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=not args.no_autocast):
        loss = torch.compile(model, backend=backend)(x, y)
    loss.backward()
    return [{"consumers": s.consumers, "error": s.estimated_error, "share": s.update_share, "source": s.error_source}
            for graph in backend.report(model).graphs for s in graph.sites
            if s.decision == "compressed" and s.codec == "velora"]


def row_sites(options: dict, sites: list[dict]) -> list[dict]:
    include, exclude = options.get("include") or ["*"], options.get("exclude") or []
    return [s for s in sites if any(any(fnmatch.fnmatchcase(c, p) for p in include) for c in s["consumers"])
            and not any(any(fnmatch.fnmatchcase(c, p) for p in exclude) for c in s["consumers"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", required=True, help="a quality_summary.json of benchmarks/quality.py")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    cli = ap.parse_args()
    summary = json.load(open(cli.summary))
    args = SimpleNamespace(**summary["config"])
    args.device = cli.device
    args.arch = getattr(args, "arch", "llama")
    rows = []
    for row in summary["rows"]:
        if row.get("status") != "ok" or row.get("relative_to_exact_pct") is None:
            continue
        kind, options = quality.parse_spec(row["regime"])
        g = options.get("sub_token_size")
        if kind != "velora" or options.get("mode") != "all" or not isinstance(g, int):
            continue  # rows with a fixed g and a fixed set of sites: what the estimate can be scored on
        rows.append((row, options, g))
    if not rows:
        sys.exit(f"{cli.summary}: no mode='all' rows with a fixed g")
    t0 = time.time()
    make_train, _, vocab, _ = quality.load_data(args, device=args.device)
    base = quality.build_model(args, vocab)
    batch = next(make_train())
    per_g = {g: site_estimates(args, base, batch, g) for g in sorted({g for _, _, g in rows})}
    table = []
    for row, options, g in rows:
        sites = row_sites(options, per_g[g])
        shares = [s["share"] for s in sites if s["share"] is not None]
        table.append({"regime": row["regime"], "g": g, "sites": len(sites),
                      "loss_cost_pct": row["relative_to_exact_pct"],
                      "isotropic": 1 - 1 / g, "activation_max": row.get("estimated_error_max"),
                      "gradient_max": max((s["error"] for s in sites), default=None),
                      "update_share_sum": sum(shares) if shares else None,
                      "sources": sorted({s["source"] for s in sites if s["source"]})})
    fit = score(table)
    # at one g, which site kinds cost more (the isotropic estimate cannot tell them apart)
    within = {str(g): score([r for r in table if r["g"] == g]) for g in sorted({r["g"] for r in table})
              if sum(r["g"] == g for r in table) >= 3}
    model = {k: getattr(args, k, None) for k in ("arch", "model", "layers", "hidden", "batch", "seq", "seed")}
    result = {"summary": cli.summary, "device": str(args.device), "torch": torch.__version__, "model": model,
              "argv": sys.argv, "seconds": round(time.time() - t0, 1), "rows": table, "spearman": fit,
              "spearman_at_one_g": within, "sites": {str(g): s for g, s in per_g.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(cli.out)), exist_ok=True)
    with open(cli.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"{'regime':60s} {'cost %':>7s} {'1-1/g':>6s} {'act':>6s} {'grad':>6s} {'share':>6s}")
    for r in table:
        fmt = lambda v: f"{v:6.3f}" if isinstance(v, (int, float)) else "     -"  # noqa: E731
        print(f"{r['regime'][:60]:60s} {r['loss_cost_pct']:7.2f} {fmt(r['isotropic'])} {fmt(r['activation_max'])} "
              f"{fmt(r['gradient_max'])} {fmt(r['update_share_sum'])}")
    print("spearman vs loss cost, all rows:", {k: None if v is None else round(v, 3) for k, v in fit.items()})
    for g, at_g in within.items():
        print(f"  rows at g = {g}:", {k: None if v is None else round(v, 3) for k, v in at_g.items()})


if __name__ == "__main__":
    main()
