"""Draw one training step of the AF-Pipe as a timeline PNG: a row per rank, a box per
action, coloured by kind (attention / expert / head, forward / backward, transfers and
waits), labelled with the micro-batch.

    ./run_train.sh --disagmoe.mode af_pipe ... --metrics.timeline_step 5
    python scripts/plot_timeline.py outputs/debug_model/timeline --out timeline.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

COLORS = {
    "attention F": "#4c72b0", "attention B": "#8fb0e0",
    "expert F": "#dd8452", "expert B": "#f2b98f",
    "head F": "#55a868", "head B": "#a6d8b0",
    "transfer": "#c44e52", "wait": "#bbbbbb",
}


def classify(name: str, stage: int, num_layers: int) -> str:
    if name in ("FORWARD", "FULL_BACKWARD"):
        kind = "head" if stage == 2 * num_layers else ("expert" if stage % 2 else "attention")
        return f"{kind} {'F' if name == 'FORWARD' else 'B'}"
    return "wait" if name == "WAIT_SENDS" else "transfer"


def load(folder: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    if not records:
        raise SystemExit(f"no rank*.json in {folder}; run with --metrics.timeline_step N")
    return sorted(records, key=lambda r: r["rank"])


def draw(records: list[dict], out: Path, min_label_frac: float = 0.025) -> None:
    end = max(e[4] for r in records for e in r["events"]) or 1.0
    fig, ax = plt.subplots(figsize=(14, 0.7 * len(records) + 1.5))
    for row, record in enumerate(records):
        for name, stage, mb, start, stop, *_ in record["events"]:
            kind = classify(name, stage, record["num_layers"])
            if kind in ("transfer", "wait") and stop - start < end * 0.002:
                continue  # posting a transfer is instant; only show the ones that waited
            ax.barh(row, stop - start, left=start, color=COLORS[kind], edgecolor="white", linewidth=0.3)
            if kind not in ("transfer", "wait") and (stop - start) > end * min_label_frac:
                ax.text(start + (stop - start) / 2, row, str(mb), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(records)))
    ax.set_yticklabels([f"rank {r['rank']} {r['pool'][0].upper()}{r['group']}" for r in records])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the step started (each row on its own rank's clock)")
    ax.set_title(f"AF-Pipe step {records[0]['step']}: boxes are stage compute (label = micro-batch), "
                 "red = blocked on a receive, grey = waiting for sends")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], ncol=4, fontsize=8,
              loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="<dump_folder>/timeline")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <folder>/timeline.png)")
    args = parser.parse_args()
    out = args.out or args.folder / "timeline.png"
    draw(load(args.folder), out)
    print(out)


if __name__ == "__main__":
    main()
