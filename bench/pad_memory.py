"""What one thin image costs to pad and preprocess (docs/operating.md, "Request limits").

Decodes a tiny ``--width`` x ``--height`` PNG (default 20 x 8000, about 1.5 KB), pads it to
the square of its long side as ``image_mode = "pad"`` does (``pad_to_square``, CLIP's mean
colour) and runs LLaVA-1.5's image processor (CLIP, 336 px) on the square, in this process;
prints the PNG's size, the seconds taken and the growth of the peak RSS (``ru_maxrss``)
over what the imports had already reached. The server now refuses such an image from its
header (``limits.max_image_pixels`` bounds the padded square); this bypasses that check.

    python bench/pad_memory.py [--width 20] [--height 8000]
"""

from __future__ import annotations

import argparse
import io
import resource
import time

from PIL import Image
from transformers import CLIPImageProcessor

from align2.server.backends.preprocess import pad_to_square


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=20)
    parser.add_argument("--height", type=int, default=8000)
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.new("RGB", (args.width, args.height), (90, 120, 150)).save(buffer, format="PNG")
    data = buffer.getvalue()
    processor = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    before = peak_rss_mb()
    started = time.perf_counter()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    square = pad_to_square(image, processor.image_mean)
    processor(images=square, return_tensors="pt")
    seconds = time.perf_counter() - started
    print(
        f"{args.width}x{args.height} PNG of {len(data) / 1000:.1f} KB, padded to "
        f"{square.width}x{square.height}: {seconds:.2f} s, peak RSS "
        f"+{peak_rss_mb() - before:.0f} MB"
    )


if __name__ == "__main__":
    main()
