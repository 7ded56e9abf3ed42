"""Example Feature Block Paste blobs as a PNG: for each preset, a row of masks and a row of the
pasted feature energy ‖x_pasted‖₂ over channels (on random normal features).

    python scripts/fbp_examples.py --out DIR [--seed 0] [--count 6] [--size 28] [--channels 16]

Writes DIR/fbp_examples.png (atomically).
"""

from __future__ import annotations

import argparse
import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from gradad.io_utils import atomic_write_bytes  # noqa: E402
from gradad.models.fbp import FBP_PRESETS, fbp_settings, feature_block_paste  # noqa: E402


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def render(seed: int, count: int, size: int, channels: int) -> bytes:
    """PNG bytes of ``count`` examples per preset on (count, channels, size, size) features."""
    features = torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(seed))
    figure, axes = plt.subplots(2 * len(FBP_PRESETS), count, figsize=(1.8 * count, 3.6 * len(FBP_PRESETS)),
                                squeeze=False)
    for row, name in enumerate(FBP_PRESETS):
        # one blob per image here, so the row shows different draws
        settings = fbp_settings(name, per_image=True)
        pasted, mask = feature_block_paste(features, settings, torch.Generator().manual_seed(seed))
        energy = pasted.norm(dim=1)
        for column in range(count):
            mask_axis, energy_axis = axes[2 * row, column], axes[2 * row + 1, column]
            mask_axis.imshow(mask[column].numpy(), cmap="gray", interpolation="nearest")
            energy_axis.imshow(energy[column].numpy(), cmap="magma", interpolation="nearest")
            mask_axis.set_xticks([]), mask_axis.set_yticks([])
            energy_axis.set_xticks([]), energy_axis.set_yticks([])
        axes[2 * row, 0].set_ylabel(f"{name}\nmask")
        axes[2 * row + 1, 0].set_ylabel(f"{name}\nenergy")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=_positive_int, default=6, help="examples per preset")
    parser.add_argument("--size", type=_positive_int, default=28, help="feature map side")
    parser.add_argument("--channels", type=_positive_int, default=16)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fbp_examples.png")
    atomic_write_bytes(path, render(args.seed, args.count, args.size, args.channels))
    print(path)
    return path


if __name__ == "__main__":
    main()
