"""The Models tab's list of suspected label errors (metrics/<task>/label_issues.csv, made by
the `labels` stage): each with its row of the CSV or its image, so a person can judge it.
Torch-free, like all of app/."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from stages.core import label_issues, layout
from stages.core.card import Card

SHOWN = 12


def tabular_rows(issues: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """The listed rows of the CSV beside their given and suggested class, worst first. Only
    those lines are parsed (skiprows), so a large CSV is not read whole."""
    from stages.tabular.data import sniff_delimiter

    wanted = set(issues["line"].astype(int))
    source = Path(source)
    # skiprows counts from 0 at the header: file line = i + 1.
    rows = pd.read_csv(
        source,
        sep=sniff_delimiter(source),
        skipinitialspace=True,
        skiprows=lambda i: i > 0 and i + 1 not in wanted,
    )
    if len(rows) != len(wanted):  # the CSV changed since the stage ran: show the list alone
        return issues
    rows.index = sorted(wanted)
    rows = rows.rename(columns={c: f"{c} (csv)" for c in rows.columns if c in issues.columns})
    joined = issues.set_index("line", drop=False).join(rows, how="left")
    return joined.reset_index(drop=True)


def image_items(issues: pd.DataFrame, source: str | Path) -> list[tuple[str, str]]:
    """(file, caption) per listed image; paths are relative to the source folder, or to the
    manifest's folder."""
    source = Path(source)
    root = source if source.is_dir() else source.parent
    return [
        (str(root / r.line), f"{r.line}: given {r.given}, suggested {r.suggested} ({r.score:.2f})")
        for r in issues.itertuples(index=False)
        if (root / r.line).is_file()
    ]


def show(gr, task: str, card: Card, metrics_dir: Path = Path("metrics")) -> None:
    """The section inside the Models tab (called in its Blocks context); nothing when the
    task has no list (detect, or before `dvc repro`)."""
    found = label_issues.read(task, metrics_dir)
    if found is None:
        return
    issues, summary = found
    head = (
        f"**Suspected label errors** (`{layout.label_issues(task)}`, docs/validation.md): "
        f"{summary['count']} of {summary['rows']} rows"
        + (
            f" ({summary['share']:.1%})"
            if summary["rows"]
            else f", skipped: {summary.get('skipped')}"
        )
    )
    gr.Markdown(head)
    if issues.empty:
        return
    top, source = issues.head(SHOWN), card.data.source
    if task == "image":
        gr.Gallery(image_items(top, source), columns=6, height=260, elem_id="models-image-labels")
    elif Path(source).is_file():
        gr.Dataframe(tabular_rows(top, source), elem_id=f"models-{task}-labels")
    else:
        gr.Dataframe(top, elem_id=f"models-{task}-labels")
