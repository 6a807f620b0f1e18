"""QNN context binaries of a compiled bundle: compile time and peak RSS per part, HTP (simulator
on x86_64) time per AR-128 and AR-1 call per part, and bytes moved per generated token.

    PYTHONPATH=src python benchmarks/bench_qnn.py BUNDLE [--from-manifest] [--skip-simulator] [--levels 0,1,3]

- compile: each part's AR graphs compiled again into one weight-shared context, in a child
  process (time and that process's peak RSS), at each HTP graph finalization optimization level
  of ``--levels`` (default: the bundle's own), with ratios against the first level listed (the
  QNN EP's default is 0); ``--from-manifest`` prints the export's own numbers;
  ``--verify-graph-cost`` (a bundle exported with ``--verify-tokens K``) compiles each part also
  without its AR-(K+1) verify graph, the baseline of the ratios: what the third graph costs.
- simulator: the calls of ``qwen-ondevice verify`` (one AR-128 and one AR-1 call per part on a
  short chat prompt), with the ORT CPU time of the same QDQ call as the baseline in the same run.
- bytes per generated token: every decoder weight read once (the embedding part reads one row)
  plus the KV cache at full context, for the bundle (measured weight bytes) and, from the config
  alone, for Qwen2-7B-Instruct at w4a16 and CL 4096 (same formulas as the planner).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_ondevice.core.bundle import read_manifest  # noqa: E402
from qwen_ondevice.core.config import ModelConfig  # noqa: E402
from qwen_ondevice.export.plan import PRECISION_BYTES, head_bytes, layer_bytes  # noqa: E402

QWEN2_7B = ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)


def bytes_per_token(cfg: ModelConfig, precision: str, cl: int, kv_bytes_per_elem: int = 1) -> dict:
    """Weights read once per generated token (decoder layers, norm and lm_head; one embedding
    row) plus the KV cache at full context (uint8 for the quantized precisions)."""
    weights = cfg.num_hidden_layers * layer_bytes(cfg, precision) + head_bytes(cfg, precision)
    emb_row = int(cfg.hidden_size * PRECISION_BYTES[precision][1])
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * kv_bytes_per_elem * cl
    return {"weights": weights + emb_row, "kv": kv, "total": weights + emb_row + kv}


def bundle_bytes_per_token(root: Path) -> dict:
    from qwen_ondevice.eval.inspect_bundle import inspect_bundle

    r = inspect_bundle(root)
    kv = r["kv_cache_bytes_full_context"]
    return {"weights": r["bytes_read_per_token_full_context"] - kv, "kv": kv, "total": r["bytes_read_per_token_full_context"]}


def recompile(root: Path, level: int, drop: frozenset[int] = frozenset()) -> list[dict]:
    """Compile each part's AR graphs (less those in ``drop``) again into one context binary in a
    child process: per part its wall time (s), the child's peak RSS (bytes) and the .bin size."""
    from qwen_ondevice.qnn.compile import compile_in_child
    from qwen_ondevice.qnn.prepare import wrapper_name

    m = read_manifest(root, verify=False)
    rows = []
    for part in m.parts:
        ars = sorted((int(a) for a in part["graphs"] if int(a) not in drop), reverse=True)
        with tempfile.TemporaryDirectory() as tmp:
            graphs = [[ar, str(root / part["graphs"][str(ar)]["file"]), str(Path(tmp) / wrapper_name(part["name"], ar))] for ar in ars]
            t0 = time.perf_counter()
            res, peak, err = compile_in_child({"chipset": m.data["qnn"]["chipset"], "graphs": graphs, "optimization": level})
            seconds = time.perf_counter() - t0
            if not res["ok"]:
                raise SystemExit(f"{part['name']}: {res['error']}")
            bin_bytes = sum(b.stat().st_size for b in Path(tmp).glob("*.bin"))
        rows.append({"name": part["name"], "compile_seconds": seconds, "peak_rss_bytes": peak, "bin_bytes": bin_bytes,
                     "weight_bytes": part["weight_bytes"], "htp_optimization": level, "graphs": ars})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--from-manifest", action="store_true", help="print the export's compile numbers instead of compiling again")
    ap.add_argument("--skip-simulator", action="store_true", help="do not run the parts on the HTP simulator")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--levels", default=None,
                    help="comma-separated HTP graph optimization levels to compile at (0-3; default: the bundle's own)")
    ap.add_argument("--verify-graph-cost", action="store_true",
                    help="also compile each part without its verify graph, and give the ratios against that")
    args = ap.parse_args()
    from qwen_ondevice.core.progress import set_quiet

    set_quiet(True)
    m = read_manifest(args.bundle)
    if "qnn" not in m.data:
        raise SystemExit(f"{args.bundle}: no QNN context binaries (export a quantized bundle with --chipset)")
    q = m.data["qnn"]
    cfg = m.config
    print(f"bundle {args.bundle}: {m.data['model']['source']}, {m.precision}, AR {m.ar_lengths}, CL {m.context_length}, "
          f"{q['chipset']} (soc {q['soc_model']}, {q['dsp_arch']}), QAIRT {q.get('qairt', '?')}")
    out = {"bundle": str(args.bundle), "chipset": q["chipset"]}

    levels = [int(x) for x in args.levels.split(",")] if args.levels else [int(q.get("htp_optimization", 3))]
    drops = [frozenset()]
    if args.verify_graph_cost:
        if len(m.ar_lengths) != 3:
            raise SystemExit(f"{args.bundle}: no verify graph (AR {m.ar_lengths}); export with --verify-tokens K")
        drops = [frozenset({sorted(m.ar_lengths)[1]}), frozenset()]
    if args.from_manifest:
        rows = q["parts"]
    else:
        rows = [r for lv in levels for drop in drops for r in recompile(args.bundle, lv, drop)]
    baseline = "the same part without its verify graph" if args.verify_graph_cost else f"level {levels[0]}"
    print(f"\ncompile ({'export manifest' if args.from_manifest else 'compiled again now, one child process per part'};"
          f" ratios against {baseline}):")
    print(f"  {'part':<14} {'graphs':<14} {'level':>5} {'seconds':>9} {'ratio':>6} {'peak RSS GB':>12} {'ratio':>6} "
          f"{'bin MB':>9} {'ratio':>6} {'bin/weights':>12}")
    base: dict[str, dict] = {}
    for r in rows:
        base.setdefault(r["name"], r)  # the first row of each part: the first level, without the verify graph if asked
    for r in rows:
        b = base[r["name"]]
        graphs = ",".join(f"AR-{a}" for a in r.get("graphs", m.ar_lengths))
        print(f"  {r['name']:<14} {graphs:<14} {r.get('htp_optimization', '?'):>5} {r['compile_seconds']:>9.1f} "
              f"{r['compile_seconds'] / b['compile_seconds']:>6.2f} {r['peak_rss_bytes'] / 1e9:>12.2f} "
              f"{r['peak_rss_bytes'] / b['peak_rss_bytes']:>6.2f} {r['bin_bytes'] / 1e6:>9.1f} "
              f"{r['bin_bytes'] / b['bin_bytes']:>6.3f} {r['bin_bytes'] / r['weight_bytes']:>12.3f}")
    out["compile"] = rows

    if not args.skip_simulator:
        from qwen_ondevice.eval.verify import verify_bundle

        t0 = time.perf_counter()
        v = verify_bundle(args.bundle)
        print(f"\nHTP calls (verify's captured inputs; {'PASS' if v['ok'] else 'FAIL'}; {time.perf_counter() - t0:.0f} s in all):")
        print(f"  {'part':<14} {'graph':<7} {'HTP s/call':>11} {'ORT CPU s/call':>15} {'HTP/CPU':>8}")
        for t in v["timings"]:
            print(f"  {t['part']:<14} AR-{t['ar']:<4} {t['htp_seconds']:>11.3f} {t['cpu_seconds']:>15.3f} "
                  f"{t['htp_seconds'] / max(t['cpu_seconds'], 1e-9):>8.1f}")
        print(f"  ({v['timings'][0]['how']})")
        out["calls"] = v["timings"]

    kv_elem = 1 if m.data["kv_cache"]["dtype"] == "uint8" else 4
    b = bundle_bytes_per_token(args.bundle)
    est = bytes_per_token(cfg, m.precision, m.context_length, kv_elem)
    big = bytes_per_token(QWEN2_7B, "w4a16", 4096, 1)
    print("\nbytes read per generated token (weights once + KV cache at full context):")
    print(f"  {'model':<44} {'weights MB':>11} {'KV MB':>9} {'total MB':>10}")
    for name, x in ((f"this bundle (measured, CL {m.context_length})", b),
                    (f"this bundle (from its config, CL {m.context_length})", est),
                    ("Qwen2-7B-Instruct w4a16, CL 4096 (config)", big)):
        print(f"  {name:<44} {x['weights'] / 1e6:>11.1f} {x['kv'] / 1e6:>9.1f} {x['total'] / 1e6:>10.1f}")
    out["bytes_per_token"] = {"bundle": b, "bundle_from_config": est, "qwen2_7b_w4a16_cl4096": big}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
