"""The experiment's table, JSON and figures."""

from __future__ import annotations

from ..common import print_table, pyplot, result_path, write_json


def size_label(capacity: int | None) -> str:
    if capacity is None:
        return "-"
    return f"{capacity // 1024}k" if capacity % 1024 == 0 else str(capacity)


LOCATE = 3  # bytes of a copy that locate it (dconv 3 matches a 3-byte context); the rest can be read from it


def after_locating(ev: dict) -> float | None:
    """Bits/byte on far copies from offset LOCATE on (every offset holds as many bytes)."""
    by_offset = [b for b in ev.get("copied_by_offset", [])[LOCATE:] if b is not None]
    return sum(by_offset) / len(by_offset) if by_offset else None


def table(results: dict) -> None:
    rows = []
    for run in results["runs"]:
        ev, tr = run["eval"], run["train"]
        rows.append([
            run["name"], size_label(run["memory"]), run["backend"] if run["memory"] else "-",
            "yes" if run["xl"] else "no", ev["bits_per_byte"], run.get("copy_eval", {}).get("copied_bits_per_byte"),
            tr["tokens"], tr["wall_s"], tr["step_s"], tr["memory_s_per_step"], ev.get("recall_at_k"),
        ])
    print_table(f"lm_memory ({results['preset']['name']} preset): held-out bits/byte, equal training budgets",
                ["configuration", "memory", "backend", "XL", "held-out bits/byte", "copy-task bits/byte",
                 "train tokens", "wall s", "s/step", "memory s/step", "recall@k"], rows)
    copy = results.get("copy_task")
    if copy:
        print_table("copy task (part 1): random bytes with passages recurring far (beyond the local context) or near",
                    ["configuration", "bits/byte on far copies", f"far, from byte {LOCATE + 1} of a copy", "on near copies",
                     "elsewhere", "train steps", "s/step"],
                    [[r["name"], r["eval"]["copied_bits_per_byte"], after_locating(r["eval"]),
                      r["eval"]["near_copied_bits_per_byte"],
                      r["eval"]["other_bits_per_byte"], r["train"]["steps"], r["train"]["step_s"]] for r in copy])


def write(results: dict, suffix: str, out_dir: str | None = None) -> list:
    paths = [write_json(result_path(f"lm_memory{suffix}.json", out_dir), results)]
    plt = pyplot()
    if plt is None:
        return paths
    if results["runs"]:
        paths.append(_plot_sizes(plt, results, result_path(f"lm_memory{suffix}_sizes.png", out_dir)))
        paths.append(_plot_positions(plt, results, result_path(f"lm_memory{suffix}_position.png", out_dir)))
    return paths


def _by_corpus(results: dict) -> dict:
    """{corpus: runs}; empty when only the copy task ran."""
    out = {}
    for run in results["runs"]:
        out.setdefault(run["corpus"], []).append(run)
    return out


def _plot_sizes(plt, results: dict, path: str) -> str:
    corpora = _by_corpus(results)
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.5), squeeze=False)
    for ax, (corpus, runs) in zip(axes[0], corpora.items()):
        exact = sorted((r for r in runs if r["memory"] and r["kind"] == "memory"), key=lambda r: r["memory"])
        if exact:
            ax.plot([r["memory"] for r in exact], [r["eval"]["bits_per_byte"] for r in exact], "o-",
                    label="kNN memory + XL (exact)")
        for r in runs:
            if r["kind"] == "approximate":
                ax.plot([r["memory"]], [r["eval"]["bits_per_byte"]], "s", ms=8,
                        label=f"kNN memory + XL ({r['backend']}, recall {r['eval'].get('recall_at_k') or 0:.2f})")
            elif r["kind"] == "memory-no-xl":
                ax.plot([r["memory"]], [r["eval"]["bits_per_byte"]], "D", ms=7, label="kNN memory, no XL (exact)")
            elif r["kind"] == "retrofit":
                ax.plot([r["memory"]], [r["eval"]["bits_per_byte"]], "^", ms=8, label=r["name"].split("/")[1])
            elif r["kind"] in ("none", "xl", "continued"):
                style = {"none": "--", "xl": ":", "continued": "-."}[r["kind"]]
                ax.axhline(r["eval"]["bits_per_byte"], ls=style, color="gray", label=r["name"].split("/")[1])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory size (tokens per row and head)")
        ax.set_ylabel("held-out bits/byte")
        ax.set_title(f"{corpus}: {results['preset']['name']} preset")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_positions(plt, results: dict, path: str) -> str:
    corpora = _by_corpus(results)
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.5), squeeze=False)
    for ax, (corpus, runs) in zip(axes[0], corpora.items()):
        for r in runs:
            if r["kind"] not in ("none", "xl", "memory", "memory-no-xl"):
                continue
            pts = [(b["from"], b["bits_per_byte"]) for b in r["eval"]["by_position"] if b["bits_per_byte"] is not None]
            ax.plot([max(p[0], 128) for p in pts], [p[1] for p in pts], "o-", ms=3, label=r["name"].split("/")[1])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in document (bytes; bucket start, first bucket drawn at 128)")
        ax.set_ylabel("held-out bits/byte")
        ax.set_title(f"{corpus}: bits/byte by position")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
