"""plot.py: the curves land in their panels, in their colours, and a key that some records
lack is drawn from the records that have it."""

import plot
from PIL import Image


def test_each_panel_draws_its_keys_in_their_colours(tmp_path):
    records = [{"step": s, "loss": 10 - s, "koleo": -s} for s in range(1, 6)]
    records[2]["probe"] = 0.5  # logged at another pace: in one record only
    records[4]["probe"] = 0.7
    path = tmp_path / "curves.png"
    plot.draw_curves(records, [{"loss": 1.0, "koleo": 0.1}, {"probe": 1.0}], path,
                     width=200, panel_height=100)
    image = Image.open(path).convert("RGB")
    assert image.size == (200, 200)
    panels = [image.crop((0, 0, 200, 100)), image.crop((0, 100, 200, 200))]
    colours = [{colour for _, colour in panel.getcolors(200 * 100)} for panel in panels]
    assert plot.COLOURS[1] in colours[0] and plot.COLOURS[1] not in colours[1]  # koleo
    # probe, the first key of its panel, in black; a line, not only its legend: black
    # pixels inside the frame, right of the 40-px margin that holds the range's numbers.
    inside = panels[1].crop((41, 41, 159, 59))
    assert (0, 0, 0) in {colour for _, colour in inside.getcolors(118 * 18)}


def test_nothing_is_drawn_before_two_records(tmp_path):
    plot.draw_curves([{"step": 1, "loss": 1.0}], [{"loss": 1.0}], tmp_path / "one.png")
    assert not (tmp_path / "one.png").exists()
