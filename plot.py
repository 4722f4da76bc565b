"""Curves of metrics.jsonl records, drawn with Pillow alone: train.py's loss.png.

A plotting library would draw nicer axes, but it would be one more dependency for one
picture that only has to show where the curves go: a frame, lines, a legend, the range.
"""

from PIL import Image, ImageDraw

# matplotlib's first colours, black first for the key that comes first (the total loss).
COLOURS = [(0, 0, 0), (31, 119, 180), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (255, 127, 14), (140, 86, 75), (227, 119, 194)]


def draw_curves(records, panels, path, width=640, panel_height=300, pad=40):
    """Panels stacked top to bottom, one per {key: factor} in `panels`: each key's value
    times its factor against the record's "step" (a loss term times its weight shows its
    share of the total). Each panel has its own vertical range; the steps are shared.
    Records without a key are left out of that key's line, so metrics logged at another
    pace can share the records. Nothing is written before there are two records."""
    if len(records) < 2:
        return
    image = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    first_step = records[0]["step"]
    last_step = records[-1]["step"]

    def x(step):
        return pad + (width - 2 * pad) * (step - first_step) / max(1, last_step - first_step)

    for index, panel in enumerate(panels):
        top = index * panel_height  # the panel's upper edge in the image
        lines = {}
        for key, factor in panel.items():
            lines[key] = [(r["step"], r[key] * factor) for r in records if key in r]
        values = [value for line in lines.values() for _, value in line]
        if not values:
            continue
        high = max(values)
        low = min(values)

        def y(value):
            fraction = (value - low) / max(high - low, 1e-9)
            return top + panel_height - pad - (panel_height - 2 * pad) * fraction

        frame = [pad, top + pad, width - pad, top + panel_height - pad]
        draw.rectangle(frame, outline=(180, 180, 180))
        legend_x = pad + 5
        for number, (key, line) in enumerate(lines.items()):
            colour = COLOURS[number % len(COLOURS)]
            points = [(x(step), y(value)) for step, value in line]
            if len(points) == 1:  # one record so far: a line from the point to itself
                points = points * 2
            draw.line(points, fill=colour, width=2)
            label = key if panel[key] == 1 else f"{key} x{panel[key]:g}"
            draw.text((legend_x, top + 8), label, fill=colour)
            legend_x += draw.textlength(label) + 15
        draw.text((5, top + pad - 12), f"{high:.2f}", fill=(0, 0, 0))
        draw.text((5, top + panel_height - pad - 12), f"{low:.2f}", fill=(0, 0, 0))
        draw.text((pad, top + panel_height - pad + 8), f"step {first_step}", fill=(0, 0, 0))
        draw.text((width - pad - 70, top + panel_height - pad + 8), f"step {last_step}",
                  fill=(0, 0, 0))
    image.save(path)
