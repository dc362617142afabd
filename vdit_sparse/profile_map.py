"""What a profile runs at every (layer, head): as text and as a PNG (``vdit-sparse inspect``).

Example::

    from vdit_sparse.profile import load_profile
    from vdit_sparse.profile_map import method_map, format_method_map

    grid = method_map(load_profile("cogvideox-5b"), num_layers=42, num_heads=48)
    print(format_method_map(grid))
"""

from __future__ import annotations

from pathlib import Path

from .profile import ResolvedProfile

__all__ = [
    "method_map", "method_symbols", "format_method_map", "write_method_map_png", "sensitivities",
    "format_sensitivities", "write_sensitivity_png",
]

# Fixed symbols for the built-in methods (and Sparse-vDiT's modes); other methods get the first free letter of their name.
_SYMBOLS = {"dense": "D", "skip": "-", "svg": "S", "sliding_frames": "W", "diagonal": "\\", "multi_diagonal": "M",
            "vertical_stripe": "|"}
_COLOURS = {"dense": (70, 70, 70), "skip": (235, 235, 235), "svg": (60, 130, 200), "sliding_frames": (90, 170, 90),
            "diagonal": (220, 140, 50), "multi_diagonal": (170, 90, 170), "vertical_stripe": (60, 170, 170)}
_OTHER_COLOURS = [(220, 140, 50), (170, 90, 170), (200, 70, 70), (60, 170, 170), (150, 150, 60)]


def method_map(profile: ResolvedProfile, num_layers: int, num_heads: int) -> list[list[str]]:
    """The method name of every head of every layer: ``grid[layer][head]`` (outside the warm-up steps).

    Sparse-vDiT heads show their mode (``diagonal``, ``skip``, ...), so a searched profile's map is its mode map.
    """
    grid = []
    for layer in range(num_layers):
        row = [""] * num_heads
        for group in profile.layer_groups(layer, num_heads):
            label = getattr(group.params, "mode", None) if group.method.name == "svdit" else None
            for head in group.heads:
                row[head] = label or group.method.name
        grid.append(row)
    return grid


def sensitivities(profile: ResolvedProfile, num_layers: int) -> list[float | None]:
    """Each layer's recorded sensitivity (``layers.N.sensitivity``, from ``vdit-sparse search``), None where absent."""
    recorded = profile.profile.layers
    return [recorded[layer].sensitivity if layer in recorded else None for layer in range(num_layers)]


def format_sensitivities(values: list[float | None], dense_layers: list[int]) -> str:
    """One line per layer with its sensitivity and a bar, the dense layers marked."""
    known = [v for v in values if v is not None]
    top = max(known) if known else 1.0
    lines = ["sensitivity (relative L2 of the output with only this layer sparse):"]
    for layer, value in enumerate(values):
        if value is None:
            continue
        bar = "#" * max(1, round(30 * value / top)) if top > 0 else ""
        lines.append(f"layer {layer:>3}  {value:.4f}  {bar}" + ("  (dense)" if layer in dense_layers else ""))
    return "\n".join(lines)


def write_sensitivity_png(values: list[float | None], dense_layers: list[int], path: str | Path, title: str = "") -> Path:
    """Sensitivity per layer as bars (dense layers dark), drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    bar, gap, left, top, height = 10, 2, 50, 30, 200
    width = max(left + len(values) * (bar + gap) + 20, left + int(font.getlength(title)) + 20)
    image = Image.new("RGB", (width, top + height + 40), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black", font=font)
    peak = max([v for v in values if v is not None] or [1.0]) or 1.0
    draw.text((4, top), f"{peak:.3g}", fill="black", font=font)
    draw.text((4, top + height - 10), "0", fill="black", font=font)
    for layer, value in enumerate(values):
        if value is None:
            continue
        x = left + layer * (bar + gap)
        y = top + height - round(height * value / peak)
        colour = (70, 70, 70) if layer in dense_layers else (60, 130, 200)
        draw.rectangle([x, y, x + bar - 1, top + height], fill=colour)
    draw.text((left, top + height + 8), f"layer 0 .. {len(values) - 1}; dark: kept dense", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def method_symbols(grid: list[list[str]]) -> dict[str, str]:
    """One character per method name in the grid."""
    symbols: dict[str, str] = {}
    for name in sorted({name for row in grid for name in row}):
        symbol = _SYMBOLS.get(name) or next(
            (c.upper() for c in name if c.isalpha() and c.upper() not in symbols.values()), "?"
        )
        symbols[name] = symbol
    return symbols


def format_method_map(grid: list[list[str]]) -> str:
    """One line per layer, one character per head, and a legend."""
    symbols = method_symbols(grid)
    width = len(str(len(grid) - 1))
    lines = [f"layer {layer:>{width}}  {''.join(symbols[name] for name in row)}" for layer, row in enumerate(grid)]
    legend = ", ".join(f"{symbol} {name}" for name, symbol in symbols.items())
    return "\n".join(lines + [f"({legend}; one character per head)"])


def write_method_map_png(grid: list[list[str]], path: str | Path, title: str = "", cell: int = 12) -> Path:
    """Layers as rows, heads as columns, one colour per method, with a legend (drawn with PIL)."""
    from PIL import Image, ImageDraw, ImageFont

    names = sorted({name for row in grid for name in row})
    colours = {}
    others = iter(_OTHER_COLOURS)
    for name in names:
        colours[name] = _COLOURS.get(name) or next(others, (128, 128, 128))
    font = ImageFont.load_default()
    left, top, legend_height = 60, 30, 18 * len(names) + 10
    heads, layers = len(grid[0]), len(grid)
    width = max(left + heads * cell + 20, left + int(font.getlength(title)) + 20)
    image = Image.new("RGB", (width, top + layers * cell + legend_height + 20), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black", font=font)
    for layer, row in enumerate(grid):
        y = top + layer * cell
        if layer % 5 == 0:
            draw.text((8, y), f"layer {layer}", fill="black", font=font)
        for head, name in enumerate(row):
            x = left + head * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colours[name])
    y = top + layers * cell + 10
    for name in names:
        draw.rectangle([left, y, left + 12, y + 12], fill=colours[name], outline="black")
        draw.text((left + 18, y), name, fill="black", font=font)
        y += 18
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
