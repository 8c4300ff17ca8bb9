"""Point labels that never overlap: the setting labels (τ, tₛ) of the quality-against-cost plots.

Labels are placed in display space once the figure's layout is final (`label_points` draws the
canvas first). Labels with the same text whose points nearly touch (e.g. "τ=0.3" of four
early-exit probes that land on the same spot) become one label for the group. Each label then
takes the first free spot beside its point(s): right, left, above, below, then the diagonals, a
few points away; a spot is free when the label stays inside the axes and covers no marker and no
label placed before it. Among the free spots next to the point, the one that crosses the fewest
drawn lines wins. Only when every spot next to the point is taken does the label move further
out, with a thin leader line back to its point(s); as a last resort, the nearest free spot
anywhere in the axes.

`text_overlaps(fig)` checks a finished figure the same way from outside: every drawn text's box
(titles, axis, tick and legend labels, point labels) against every other and against the data
points of its panel, and every legend against its panel's data; tests/test_plots.py runs it on
every figure of `duodiff plots`.
"""

from __future__ import annotations

import itertools

import numpy as np

MERGE_PT = 12.0   # labels with the same text whose points lie this close (points) become one
MARKER_PT = 4.0   # half the size of the box a marker (with its error-bar caps) keeps free
GAP_PT = 1.5      # between a point's marker and its label
RINGS = 4         # spots at GAP_PT, then one label height further out each ring (leader lines)
DIRECTIONS = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]
MIXED_COLOR = "black"  # a label shared by points of several series
PAD = 0.15  # the label's white background reaches this many font sizes beyond its text
BACKGROUND = dict(boxstyle=f"square,pad={PAD}", facecolor="white", edgecolor="none", alpha=0.8)
LEADER = dict(arrowstyle="-", lw=0.6, alpha=0.6, shrinkA=0, shrinkB=0)


def label_points(ax, annotations: list[dict], points: list[tuple[float, float]], fontsize: float) -> list[dict]:
    """Draw the annotations ({"sets", "text", "x", "y", "color"}, data coordinates) on ax without
    overlaps, keeping clear of the markers at `points`; return the labels as drawn (merged groups
    with their spot: "label_x", "label_y" in data coordinates, "leader": whether a line joins it
    to its points)."""
    if not annotations:
        return []
    fig = ax.get_figure(root=True)
    fig.canvas.draw()  # the final layout: where the axes and every point are on the figure
    to_px = fig.dpi / 72.0
    at = ax.transData.transform([(a["x"], a["y"]) for a in annotations])
    markers = ax.transData.transform(points)
    placer = Placer(ax, [box_around(xy, MARKER_PT * to_px) for xy in markers], fontsize)
    groups = merge_close(annotations, at, MERGE_PT * to_px)
    # The most crowded first: they need the spots next to their points most.
    groups.sort(key=lambda g: -crowding(at[g], markers, 30 * to_px))
    return [placer.place([annotations[i] for i in group], at[group]) for group in groups]


def merge_close(annotations: list[dict], at: np.ndarray, radius: float) -> list[list[int]]:
    """Groups of annotation indices (single linkage): same text, points within `radius` pixels."""
    groups: list[list[int]] = []
    for i, item in enumerate(annotations):
        joined = [g for g in groups if annotations[g[0]]["text"] == item["text"]
                  and np.linalg.norm(at[g] - at[i], axis=1).min() <= radius]
        groups = [g for g in groups if g not in joined] + [sorted([i, *(j for g in joined for j in g)])]
    return groups


def crowding(at: np.ndarray, points: np.ndarray, radius: float) -> int:
    """How many of `points` lie within `radius` pixels of a label's points."""
    distances = np.linalg.norm(points[:, None, :] - at[None, :, :], axis=2)
    return int((distances <= radius).any(axis=1).sum())


def box_around(xy, half: float) -> tuple[float, float, float, float]:
    return (xy[0] - half, xy[1] - half, xy[0] + half, xy[1] + half)


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def line_samples(ax, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Display points every `spacing` pixels along the axes' drawn lines and error bars, (N, 2),
    and the number of the line (or error bar) each lies on, (N,)."""
    from matplotlib.collections import LineCollection

    paths = [line.get_transform().transform(line.get_xydata()) for line in ax.get_lines()
             if line.get_visible() and line.get_linestyle() not in ("None", "none", "", " ")]
    for collection in ax.collections:
        if isinstance(collection, LineCollection):
            paths += [collection.get_transform().transform(seg) for seg in collection.get_segments()]
    samples, owners = [np.zeros((0, 2))], [np.zeros(0, int)]
    for number, path in enumerate(paths):
        for start, end in zip(path[:-1], path[1:]):
            n = max(2, int(np.hypot(*(end - start)) / spacing) + 1)
            samples.append(start + np.linspace(0.0, 1.0, n)[:, None] * (end - start))
            owners.append(np.full(n, number))
    samples, owners = np.concatenate(samples), np.concatenate(owners)
    finite = np.isfinite(samples).all(axis=1)
    return samples[finite], owners[finite]


class Placer:
    """Free spots for labels on one axes, taken one label at a time."""

    def __init__(self, ax, markers: list[tuple], fontsize: float):
        self.ax, self.fontsize = ax, fontsize
        fig = ax.get_figure(root=True)
        self.renderer = fig.canvas.get_renderer()
        self.to_px = fig.dpi / 72.0
        self.pad = PAD * fontsize * self.to_px  # a label's box: its text and its background's padding
        self.frame = ax.get_window_extent(self.renderer)
        self.taken = list(markers)  # markers and labels: no label may cover them
        self.labels: list[tuple] = []  # labels: no leader line may cross them
        self.lines, self.line_of = line_samples(ax, spacing=self.to_px)

    def place(self, members: list[dict], at: np.ndarray) -> dict:
        text = members[0]["text"]
        colors = {str(m["color"]) for m in members}
        color = members[0]["color"] if len(colors) == 1 else MIXED_COLOR
        width, height = self.size(text)
        anchor = np.vstack([box_around(xy, MARKER_PT * self.to_px) for xy in at])
        anchor = (anchor[:, 0].min(), anchor[:, 1].min(), anchor[:, 2].max(), anchor[:, 3].max())
        centre = at.mean(axis=0)
        box, leader = self.spot(anchor, centre, width, height)
        self.taken.append(box)
        self.labels.append(box)
        if leader:  # later labels keep off it where they can, as off any other line
            samples = leader_samples(centre, box, self.to_px)
            self.lines = np.vstack([self.lines, samples])
            self.line_of = np.append(self.line_of, np.full(len(samples), self.line_of.max(initial=0) + 1))
        x, y = self.ax.transData.inverted().transform(centre)
        offset = (box[0] + self.pad - centre[0]) / self.to_px, (box[1] + self.pad - centre[1]) / self.to_px
        self.ax.annotate(
            text, (x, y), xytext=offset, textcoords="offset points", ha="left", va="bottom", fontsize=self.fontsize,
            color=color, annotation_clip=False, bbox=BACKGROUND,
            arrowprops={**LEADER, "color": color} if leader else None,
        ).set_in_layout(False)
        label_x, label_y = self.ax.transData.inverted().transform((box[0], box[1]))
        return {"sets": [s for m in members for s in m["sets"]], "text": text, "x": float(x), "y": float(y),
                "color": color, "label_x": float(label_x), "label_y": float(label_y), "leader": leader}

    def size(self, text: str) -> tuple[float, float]:
        """Width and height of a label's box in pixels: its text and background."""
        probe = self.ax.text(0, 0, text, fontsize=self.fontsize)
        extent = probe.get_window_extent(self.renderer)
        probe.remove()
        return extent.width + 2 * self.pad, extent.height + 2 * self.pad

    def free(self, box, centre, leader: bool) -> bool:
        """Whether a label can go in `box`: inside the axes, covering no marker or label, and, if it
        needs a leader line back to `centre`, one that crosses no label."""
        inside = (box[0] >= self.frame.x0 + 1 and box[2] <= self.frame.x1 - 1
                  and box[1] >= self.frame.y0 + 1 and box[3] <= self.frame.y1 - 1)
        if not inside or any(overlaps(box, other) for other in self.taken):
            return False
        if not leader:
            return True
        x, y = leader_samples(centre, box, self.to_px).T
        return not any(((x > b[0]) & (x < b[2]) & (y > b[1]) & (y < b[3])).any() for b in self.labels)

    def crossings(self, box) -> int:
        """How many drawn lines and error bars pass under a label box."""
        x, y = self.lines[:, 0], self.lines[:, 1]
        return len(np.unique(self.line_of[(x > box[0]) & (x < box[2]) & (y > box[1]) & (y < box[3])]))

    def spot(self, anchor, centre, width: float, height: float) -> tuple[tuple, bool]:
        """The best free box for a label of this size beside `anchor`, and whether it needs a leader:
        in the nearest ring with a free box, the one that covers the fewest lines, the DIRECTIONS
        order (right and left read best) weighing in as a third of a line per rank."""
        for ring in range(RINGS):
            boxes = ring_boxes(anchor, width, height, GAP_PT * self.to_px + ring * height)
            free = [(self.crossings(box) + rank / 3, box) for rank, box in enumerate(boxes)
                    if self.free(box, centre, leader=ring > 0)]
            if free:
                return min(free, key=lambda item: item[0])[1], ring > 0
        return self.anywhere(centre, width, height), True

    def anywhere(self, centre, width: float, height: float) -> tuple:
        """The free box nearest `centre` on a grid over the axes (or right of it when the axes has
        no room left)."""
        xs = np.arange(self.frame.x0 + 1, self.frame.x1 - width, height / 2)
        ys = np.arange(self.frame.y0 + 1, self.frame.y1 - height, height / 2)
        grid = sorted(((x, y) for x in xs for y in ys),
                      key=lambda p: np.hypot(p[0] + width / 2 - centre[0], p[1] + height / 2 - centre[1]))
        for x, y in grid:
            if self.free((x, y, x + width, y + height), centre, leader=True):
                return (x, y, x + width, y + height)
        return (centre[0], centre[1] - height / 2, centre[0] + width, centre[1] + height / 2)


def leader_samples(centre, box, spacing: float) -> np.ndarray:
    """Points every `spacing` pixels along a leader line as annotate draws it: from `centre` towards
    the middle of `box` (the part inside the box is hidden under the label's background)."""
    end = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    n = max(2, int(np.hypot(*(end - centre)) / spacing) + 1)
    return centre + np.linspace(0.0, 1.0, n)[:, None] * (end - centre)


def ring_boxes(anchor, width: float, height: float, distance: float) -> list[tuple]:
    """Label boxes `distance` pixels from the anchor box, one per direction of DIRECTIONS."""
    x0, y0, x1, y1 = anchor
    boxes = []
    for dx, dy in DIRECTIONS:
        left = {1: x1 + distance, -1: x0 - distance - width, 0: (x0 + x1 - width) / 2}[dx]
        bottom = {1: y1 + distance, -1: y0 - distance - height, 0: (y0 + y1 - height) / 2}[dy]
        boxes.append((left, bottom, left + width, bottom + height))
    return boxes


def _drawn_texts(fig) -> list:
    """Every text the figure draws, with its box in display pixels: titles, axis and tick labels,
    legend entries, point labels. Tick labels matplotlib does not draw (ticks located outside the
    view, tick objects kept for reuse, labels switched off) and texts of hidden axes are left out."""
    from matplotlib.text import Text

    tick_owner, drawn = {}, set()  # tick label -> its axes (a label's own .axes can be unset)
    owner = {}  # axis labels and titles -> their axes, for the same reason
    for ax in fig.get_axes():
        owner.update({id(t): ax for t in (ax.xaxis.label, ax.yaxis.label, ax.title, ax._left_title, ax._right_title)})
        for axis in ax._axis_map.values():
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                tick_owner.update({id(tick.label1): ax, id(tick.label2): ax})
            # The ticks matplotlib draws now (private, but the one place that says which).
            if ax.get_visible() and ax.axison:
                for tick in axis._update_ticks():
                    drawn.update(id(label) for label in (tick.label1, tick.label2) if label.get_visible())
    texts = []
    for text in fig.findobj(Text):
        ax = tick_owner.get(id(text), owner.get(id(text), text.axes))
        if not text.get_visible() or not text.get_text().strip() or (ax is not None and not ax.get_visible()):
            continue
        if id(text) in tick_owner and id(text) not in drawn:
            continue
        texts.append((text, Text.get_window_extent(text)))  # the text's own box, without a leader line
    return texts


def _data_points(ax) -> np.ndarray:
    """Display coordinates of the data an axes draws: every vertex of its lines (markers, line
    corners) and of its error bars' ends; not the grid, the bands or spans."""
    from matplotlib.collections import LineCollection

    points = []
    for line in ax.get_lines():
        if not line.get_visible() or line.get_label() in ("_nolegend_",):
            continue
        xy = line.get_xydata()
        if len(xy) and line.get_transform() == ax.transData:
            points.append(ax.transData.transform(xy))
    for collection in ax.collections:
        if isinstance(collection, LineCollection) and collection.get_visible():
            for segment in collection.get_segments():
                if len(segment):
                    points.append(ax.transData.transform(segment))
    return np.concatenate(points) if points else np.zeros((0, 2))


def text_overlaps(fig, pad_px: float = 0.5) -> list[str]:
    """What the figure's texts cover, each as one line: two texts whose boxes overlap, or a text or
    legend that covers a data point (a line's vertex or marker, an error bar's end) of the axes it
    lies on. Empty when every text reads clear. The canvas is drawn first (the final layout)."""
    fig.canvas.draw()
    texts = _drawn_texts(fig)
    found = []
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        if (box_a.x0 + pad_px < box_b.x1 and box_b.x0 + pad_px < box_a.x1
                and box_a.y0 + pad_px < box_b.y1 and box_b.y0 + pad_px < box_a.y1):
            found.append(f"text {a.get_text()!r} overlaps text {b.get_text()!r}")
    covering = [(repr(text.get_text()), box, text.axes) for text, box in texts if text.axes is not None]
    for ax in fig.get_axes():
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            covering.append(("the legend", legend.get_window_extent(), ax))
    for what, box, ax in covering:
        if not ax.get_visible() or what == "the legend" and not ax.bbox.overlaps(box):
            continue
        points = _data_points(ax)
        inside = ((points[:, 0] > box.x0 + pad_px) & (points[:, 0] < box.x1 - pad_px)
                  & (points[:, 1] > box.y0 + pad_px) & (points[:, 1] < box.y1 - pad_px))
        if inside.any():
            found.append(f"{what} covers {int(inside.sum())} data point(s) of the panel {ax.get_title()!r}")
    return found
