"""What every command shares: progress as plain lines where stderr is a file; tables that fold, never cut."""
import io

from rich.console import Console

from gavel.cli import common
from gavel.cli.common import ProgressLines, make_table, progress_bar


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _capture(monkeypatch) -> io.StringIO:
    stream = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=stream, width=80))
    return stream


def test_progress_to_a_file_is_a_line_per_tenth(monkeypatch):
    stream = _capture(monkeypatch)
    with progress_bar("collecting activations", 1000) as advance:
        for _ in range(100):
            advance(10)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0] == "collecting activations: 100/1000 (10%) 00:00 elapsed"
    assert lines[-1] == "collecting activations: 1000/1000 (100%) 00:00 elapsed"


def test_progress_lines_come_every_30_seconds_between_tenths_and_at_the_end(monkeypatch):
    stream = _capture(monkeypatch)
    clock = _Clock()
    lines = ProgressLines("fitting", 1000, clock=clock)
    for _ in range(50):              # 50 steps of 1: under a tenth, one step per 10 s
        clock.now += 10
        lines.advance(1)
    clock.now = 3725
    lines.finish()
    out = stream.getvalue().splitlines()
    assert out[0] == "fitting: 3/1000 (0%) 00:30 elapsed"
    assert len(out) == 50 // 3 + 1
    assert out[-1] == "fitting: 50/1000 (5%) 1:02:05 elapsed"


def test_tables_fold_long_cells_instead_of_cutting_them():
    stream = io.StringIO()
    table = make_table("CE", "read at", "AUROC", numeric=("AUROC",))
    site = "blocks.11.attn.hook_z+blocks.12.attn.hook_z+blocks.13.attn.hook_z"
    table.add_row("a_ce_with_a_rather_long_name_indeed", site, "0.987")
    Console(file=stream, width=40).print(table)
    text = stream.getvalue()
    assert "…" not in text and "..." not in text
    cells = [line.split("│")[1:-1] for line in text.splitlines() if line.count("│") == 4]
    columns = ["".join(row[i].strip() for row in cells) for i in range(3)]       # body rows (the header has ┃)
    assert columns == ["a_ce_with_a_rather_long_name_indeed", site, "0.987"]
    assert [c.justify for c in table.columns] == ["left", "left", "right"]
