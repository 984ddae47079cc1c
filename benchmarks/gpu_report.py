"""The GPU run's report: Markdown tables (preamble, truth, speed and memory, long context) and a PNG chart."""

from __future__ import annotations

from pathlib import Path


def write(data: dict, out: Path, order: list[str]) -> None:
    text = markdown(data)
    try:
        chart(data, out.with_suffix(".png"), order)
    except ImportError as err:  # a bare image without matplotlib: the tables still come out
        text += f"\nNo chart: {err.name or err} is missing (benchmarks/fetch_wheels.sh carries it).\n"
        print(f"report: no chart, {err.name or err} is missing", flush=True)
    out.with_suffix(".md").write_text(text)


def markdown(data: dict) -> str:
    """The README's tables: preamble, truth checks, speed and memory per shape, then long context."""
    dtypes = ", ".join(sorted({r["dtype"] for r in data["rows"]}))
    pre = data.get("preamble") or {}
    lines = [
        f"Device: {data.get('device')}, torch {data.get('torch')}, triton {data.get('triton')}, "
        f"commit {data.get('commit')}, {data.get('date')}"
        + (" (CPU dry run: not a measurement of anything)" if data.get("dry_run") else "")
        + ".",
    ]
    if pre:
        g, c = pre["gemm"], pre["copy"]
        lines += [
            "",
            f"Same run: cuBLAS {g['dtype']} GEMM ({g['N']} x {g['H']} x {g['V']}) {g['tflops']:.1f} TFLOP/s, "
            f"device copy {c['gbs']:.0f} GB/s (read + write); per-shape GEMM times in the record's "
            "preamble.gemms.",
        ]
    if data.get("phases"):
        lines += ["", "| phase | status | seconds | box (s) | note |", "|:---|:---|---:|---:|:---|"]
        for p in data["phases"]:
            note = "; ".join(x for x in (p.get("note", ""), _missing(p.get("missing_packages"))) if x)
            lines.append(f"| {p['phase']} | {p['status']} | {p['seconds']:g} | {p['limit_s']:g} | {note} |")
    if data.get("not_run"):
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in data["not_run"].items()) + "."]
    fp32 = pre.get("fp32_out_gemm")
    if isinstance(fp32, dict):
        why = fp32.get("error") or fp32.get("note")
        lines += [
            "",
            f"fp32-output GEMM for dW: the import-time probe says {fp32.get('probe')}, a real call in the "
            f"preamble ran: {fp32.get('ran')}" + (f" ({why})" if why else "") + "; the loss rows record "
            "whether their dW accumulation used it (fp32_out_gemm).",
        ]
    if data.get("truth"):
        lines += [
            "",
            "| truth check | backend | dtype | N x H x V | max rel err | ok |",
            "|:---|:---|:---|:---|---:|:---|",
        ]
        for t in data["truth"]:
            err = "" if t.get("max_rel_err") is None else f"{t['max_rel_err']:.2e}"
            ok = (
                t.get("skipped")
                and "skipped"
                or ("yes" if t.get("ok") else f"NO: {t.get('status', '')[:60]}")
            )
            lines.append(
                f"| {t['config']} | {t['backend']} | {t['dtype']} | {t['N']} x {t['H']} x {t['V']} "
                f"| {err} | {ok} |"
            )
    lines += [
        "",
        f"Forward + backward of the whole GRPO loss (dapo, token level, old log-probs; beta=0.04 adds ref "
        f"log-probs; the `-logprobs` rows: no-grad log-probs only), {dtypes}, every token unmasked.",
        "",
        "| N | H | V | beta | implementation | ms | model ms | TFLOP/s | vs cuBLAS GEMM "
        "| peak MB above inputs | tile rows |",
        "|---:|---:|---:|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        model = f"{r['predicted_ms']:.1f}" if r.get("predicted_ms") is not None else ""
        rows = str(r.get("chunk_rows") or "")
        if r.get("ms") is None:
            cells = [("cut" if r.get("cut") else r.get("error", "failed"))[:40], model, "", "", "", rows]
        else:
            peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else ""
            cells = [
                f"{r['ms']:.1f}",
                model,
                f"{r['tflops']:.0f}",
                f"{100 * r['gemm_ratio']:.0f}%",
                peak,
                rows,
            ]
        head = f"| {r['N']} | {r['H']} | {r['V']} | {r['beta']} | {r['impl']} | "
        lines.append(head + " | ".join(cells) + " |")
    modelled = [r for r in data["rows"] if r.get("model")]
    if modelled:
        terms = list(dict.fromkeys(k for r in modelled for k in r["model"]))
        lines += ["", "The model's terms, ms (docs/benchmarks.md, The model):", ""]
        lines += ["| N | beta | implementation | " + " | ".join(terms) + " |"]
        lines += ["|---:|---:|:---|" + "---:|" * len(terms)]
        for r in modelled:
            cells = [f"{r['model'][t]:.2f}" if t in r["model"] else "" for t in terms]
            lines.append(f"| {r['N']} | {r['beta']} | {r['impl']} | " + " | ".join(cells) + " |")
    if data.get("long_context"):
        lines += ["", "| implementation | largest N in budget | H | V | budget |"]
        lines += ["|:---|---:|---:|---:|---:|"]
        for r in data["long_context"]:
            n = r.get("max_N")
            shown = "error" if n is None else (f">= {n}" if r.get("capped") else str(n))
            lines.append(f"| {r['impl']} | {shown} | {r['H']} | {r['V']} | {r['budget_gb']:g} GB |")
    return "\n".join(lines) + "\n"


def _missing(packages: list[str] | None) -> str:
    return f"missing packages: {', '.join(packages)}" if packages else ""


def chart(data: dict, path: Path, order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r.get("ms") is not None]
    cases = sorted({(r["N"], r["H"], r["V"], r["beta"]) for r in data["rows"]})
    present = list(dict.fromkeys(r["impl"] for r in data["rows"]))
    impls = [i for i in order if i in present] + [i for i in present if i not in order]
    panels = 3 if data.get("long_context") else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        by_case = {(r["N"], r["H"], r["V"], r["beta"]): r for r in rows if r["impl"] == impl}
        xs = [i + k * width for i in range(len(cases))]
        speed = [100 * by_case[c]["gemm_ratio"] if c in by_case else 0.0 for c in cases]
        memory = [(by_case[c]["peak_mb"] or 0.0) / 1024 if c in by_case else 0.0 for c in cases]
        axes[0].bar(xs, speed, width, label=impl)
        axes[1].bar(xs, memory, width, label=impl)
    labels = [f"{n // 1024}k x {h} x {v // 1000}k\nbeta={b}" for n, h, v, b in cases]
    for ax, title in zip(axes[:2], ("speed: % of cuBLAS GEMM rate (3 GEMMs)", "peak GiB above inputs"),
                         strict=True):  # fmt: skip
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels, fontsize=7)
        ax.set_title(title)
    if any(r["peak_mb"] and r["peak_mb"] > 0 for r in rows):  # NaN on CPU smoke runs
        axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    if panels == 3:
        longs = [r for r in data["long_context"] if r.get("max_N")]
        axes[2].barh([r["impl"] for r in longs], [r["max_N"] / 1024 for r in longs])
        budget = data["long_context"][0]["budget_gb"]
        h, v = data["long_context"][0]["H"], data["long_context"][0]["V"]
        axes[2].set_title(f"largest N (k tokens) in {budget:g} GB, H={h}, V={v}")
    dtypes = ", ".join(sorted({r["dtype"] for r in data["rows"]}))
    fig.suptitle(f"GRPO loss, forward + backward, {data.get('device')}, {dtypes}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
